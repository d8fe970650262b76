-- Stripe: events handled exactly once (by event id, even when Stripe retries), the
-- customer of each organization, and the time of the last billing event applied to its
-- license so that an older event arriving late changes nothing.
CREATE TABLE stripe_events (
    id          text PRIMARY KEY,
    type        text        NOT NULL,
    org_id      text,
    received_at timestamptz NOT NULL,
    outcome     text        NOT NULL
);
ALTER TABLE organizations
    ADD COLUMN stripe_customer text UNIQUE,
    ADD COLUMN billing_event_at timestamptz;

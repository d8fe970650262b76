-- License state per organization: active, past_due (a payment failed; inside the grace
-- period features switch off in the configured order), suspended (grace over, or set by
-- an operator), canceled. past_due_since starts the grace clock.
ALTER TABLE organizations
    ADD COLUMN license_state text NOT NULL DEFAULT 'active'
        CHECK (license_state IN ('active', 'past_due', 'suspended', 'canceled')),
    ADD COLUMN past_due_since timestamptz;

-- Who did what to an organization outside the token movements of the journal.
CREATE TABLE admin_actions (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL,
    org_id  text        NOT NULL,
    actor   text        NOT NULL,
    action  text        NOT NULL,
    detail  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX admin_actions_by_org ON admin_actions (org_id, id);

-- gw_reserve gains the license gate (new parameters and result column): dropped once here.
DROP FUNCTION IF EXISTS gw_reserve(text, text, bigint, text[], text, text, text, text,
                                   double precision, timestamptz, jsonb);

-- Stripe, continued: license and plan events are ordered separately (an invoice says
-- nothing about a later subscription change, and the other way round), and every pack paid
-- through a payment intent is remembered, so that a refund or dispute of that payment
-- takes back what is left of its tokens, exactly once.
ALTER TABLE organizations
    ADD COLUMN license_event_at timestamptz,
    ADD COLUMN plan_event_at timestamptz;
UPDATE organizations SET license_event_at = billing_event_at, plan_event_at = billing_event_at
    WHERE billing_event_at IS NOT NULL;
ALTER TABLE organizations DROP COLUMN billing_event_at;

-- gw_stripe_apply now answers (status, org, customer_org) and records the payment intent.
DROP FUNCTION IF EXISTS gw_stripe_apply(text, text, text, text, text, text, bigint, text, text,
                                        timestamptz, timestamptz);

-- One payment (a Stripe payment intent) and the pack it paid for. Money is in the
-- currency's smallest unit, as Stripe counts it; refunded and disputed are the largest
-- amounts Stripe has reported. clawed_back + unbilled is how much of the pack has been
-- reversed: clawed_back taken from the purchased bucket, unbilled already spent.
-- org_id is NULL while only a refund or dispute has been seen (not a pack, or a pack whose
-- checkout event has not been applied yet: it is reversed as soon as it is).
CREATE TABLE stripe_payments (
    payment_intent text PRIMARY KEY,
    charge         text,
    event_id       text REFERENCES stripe_events (id),
    org_id         text REFERENCES organizations (id),
    token_type     text,
    tokens         bigint CHECK (tokens > 0),
    paid           bigint CHECK (paid >= 0),
    refunded       bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    disputed       bigint NOT NULL DEFAULT 0 CHECK (disputed >= 0),
    clawed_back    bigint NOT NULL DEFAULT 0 CHECK (clawed_back >= 0),
    unbilled       bigint NOT NULL DEFAULT 0 CHECK (unbilled >= 0),
    CHECK ((org_id IS NULL) = (tokens IS NULL) AND (org_id IS NULL) = (token_type IS NULL)),
    CHECK (clawed_back + unbilled <= coalesce(tokens, 0))
);
CREATE INDEX stripe_payments_by_charge ON stripe_payments (charge) WHERE charge IS NOT NULL;

-- Every reversal of a pack: the tokens taken back (also a journal row of kind 'adjust') and
-- those that could not be, having been spent already (unbilled: for an operator to settle).
CREATE TABLE stripe_clawbacks (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL,
    event_id       text        NOT NULL REFERENCES stripe_events (id),
    payment_intent text        NOT NULL REFERENCES stripe_payments (payment_intent),
    org_id         text        NOT NULL REFERENCES organizations (id),
    token_type     text        NOT NULL,
    clawed_back    bigint      NOT NULL CHECK (clawed_back >= 0),
    unbilled       bigint      NOT NULL CHECK (unbilled >= 0),
    reason         text        NOT NULL
);
CREATE INDEX stripe_clawbacks_unbilled ON stripe_clawbacks (org_id) WHERE unbilled > 0;

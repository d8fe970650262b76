-- Each dispute of a payment by its Stripe id, so that a dispute the merchant wins gives its
-- pack back: a payment's disputed amount is the sum of its disputes not won, whatever order
-- Stripe's events arrive in (a won dispute seen before its opening stays won).
CREATE TABLE stripe_disputes (
    id             text        PRIMARY KEY,
    payment_intent text        NOT NULL REFERENCES stripe_payments (payment_intent),
    amount         bigint      NOT NULL CHECK (amount >= 0),
    won            boolean     NOT NULL DEFAULT false
);
CREATE INDEX stripe_disputes_by_payment ON stripe_disputes (payment_intent);

-- gw_stripe_reverse gains the dispute's id and whether it was won.
DROP FUNCTION IF EXISTS gw_stripe_reverse(text, text, text, text, bigint, bigint, bigint,
                                          timestamptz);

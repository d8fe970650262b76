-- Who may settle a reservation: the proxy's are settled by the proxy (or the sweeper), the
-- two-phase API's only through the API, by the same organization.
ALTER TABLE reservations
    ADD COLUMN source text NOT NULL DEFAULT 'proxy' CHECK (source IN ('proxy', 'api')),
    -- What the idempotency key was first used for (computed by the caller): the same key
    -- reused for another request is refused instead of answering the first reservation.
    ADD COLUMN idempotency_fingerprint text;

-- Allowance spent or held in this period beyond what the plan now allocates, after a move
-- to a smaller plan. Allowance that a settlement releases pays this off first (a 'lapse'
-- entry) instead of coming back, so no plan change lets the allowance exceed the new
-- plan's. Zero again at the next period.
ALTER TABLE accounts
    ADD COLUMN overdrawn bigint NOT NULL DEFAULT 0 CHECK (overdrawn >= 0);

-- Signatures that change (the gate is shared; settle checks the owner): dropped once here.
DROP FUNCTION IF EXISTS gw_reserve(text, text, bigint, text[], text, text, text, text,
                                   double precision, timestamptz, jsonb, int, int);
DROP FUNCTION IF EXISTS gw_settle(uuid, text, bigint, timestamptz, text, text);
DROP FUNCTION IF EXISTS gw_shadow(text, text, bigint, bigint, text[], text, text, text,
                                  timestamptz, boolean);

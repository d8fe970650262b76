-- The ledger's tables. Token amounts are bigint everywhere; balances can never go negative.

CREATE TABLE plans (
    name   text PRIMARY KEY,
    period text NOT NULL CHECK (period IN ('month', 'week', 'day'))
);

-- The allowance each plan grants per token type and period; synced from rules.yaml at start.
CREATE TABLE plan_allowances (
    plan       text   NOT NULL REFERENCES plans (name) ON DELETE CASCADE,
    token_type text   NOT NULL,
    amount     bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (plan, token_type)
);

-- No foreign key to plans: a plan removed from rules.yaml must not make an organization
-- unloadable; an unknown plan simply grants nothing.
CREATE TABLE organizations (
    id             text PRIMARY KEY CHECK (id <> '' AND length(id) <= 200),
    plan           text        NOT NULL,
    billing_anchor timestamptz NOT NULL,
    created_at     timestamptz NOT NULL
);

-- One organization's balance of one token type. allowance and purchased are what is
-- available; reserved is what held reservations have taken out of them.
CREATE TABLE accounts (
    org_id       text        NOT NULL REFERENCES organizations (id),
    token_type   text        NOT NULL,
    allowance    bigint      NOT NULL DEFAULT 0 CHECK (allowance >= 0),
    purchased    bigint      NOT NULL DEFAULT 0 CHECK (purchased >= 0),
    reserved     bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    allocated    bigint      NOT NULL DEFAULT 0 CHECK (allocated >= 0),
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    last_used_at timestamptz,
    PRIMARY KEY (org_id, token_type)
);

CREATE TABLE reservations (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          text        NOT NULL,
    token_type      text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0),
    from_allowance  bigint      NOT NULL CHECK (from_allowance >= 0),
    from_purchased  bigint      NOT NULL CHECK (from_purchased >= 0),
    period_start    timestamptz NOT NULL,
    state           text        NOT NULL DEFAULT 'held'
                    CHECK (state IN ('held', 'committed', 'refunded', 'expired')),
    charged         bigint CHECK (charged >= 0 AND charged <= amount),
    route           text,
    user_id         text,
    request_id      text,
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    settled_at      timestamptz,
    FOREIGN KEY (org_id, token_type) REFERENCES accounts (org_id, token_type),
    CHECK (from_allowance + from_purchased = amount)
);
CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE state = 'held';
CREATE INDEX reservations_by_account ON reservations (org_id, token_type, created_at);
CREATE UNIQUE INDEX reservations_by_idempotency_key
    ON reservations (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Every movement of tokens. The three deltas of an account's rows add up to its three
-- balances. Kinds: grant, refresh, purchase and adjust create or destroy tokens; lapse
-- destroys unused allowance of a finished period; reserve, refund and expire only move
-- tokens between buckets; commit destroys exactly what was charged.
CREATE TABLE journal (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL,
    org_id          text        NOT NULL,
    token_type      text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN (
                        'grant', 'refresh', 'lapse', 'purchase', 'reserve',
                        'commit', 'refund', 'expire', 'adjust')),
    allowance_delta bigint      NOT NULL DEFAULT 0,
    purchased_delta bigint      NOT NULL DEFAULT 0,
    reserved_delta  bigint      NOT NULL DEFAULT 0,
    reservation_id  uuid,
    route           text,
    user_id         text,
    actor           text,
    reason          text,
    request_id      text
);
CREATE INDEX journal_by_account ON journal (org_id, token_type, id);
CREATE INDEX journal_by_reservation ON journal (reservation_id) WHERE reservation_id IS NOT NULL;

CREATE FUNCTION journal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();

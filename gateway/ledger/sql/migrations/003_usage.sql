-- Functions whose signature or result changed are dropped once here; functions.sql, run
-- at every start, only ever replaces them in place (keeping their identity, so other
-- replicas' prepared statements stay valid).
DROP FUNCTION IF EXISTS gw_reserve(text, text, bigint, text[], text, text, text, text,
                                   double precision, timestamptz);
DROP FUNCTION IF EXISTS gw_settle(uuid, text, bigint, timestamptz, text, text);
DROP FUNCTION IF EXISTS gw_expire_overdue(timestamptz, int);
DROP FUNCTION IF EXISTS gw_shadow(text, text, bigint, bigint, text[], text, text, text,
                                  timestamptz);

-- Usage visibility: what a caller attached to a reservation, an index that answers an
-- organization's usage for a period without scanning the journal, the threshold events
-- already announced, and webhooks that could not be delivered.
ALTER TABLE reservations ADD COLUMN metadata jsonb;

CREATE INDEX journal_commits_by_org_time ON journal (org_id, at) WHERE kind = 'commit';

CREATE TABLE threshold_events (
    org_id       text        NOT NULL,
    token_type   text        NOT NULL,
    period_start timestamptz NOT NULL,
    threshold    numeric     NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (org_id, token_type, period_start, threshold)
);

CREATE TABLE webhook_dead_letters (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL,
    url      text        NOT NULL,
    body     jsonb       NOT NULL,
    attempts int         NOT NULL,
    error    text        NOT NULL
);

-- Per-user and per-team quotas: what one user, or the members of a named team together,
-- may spend of a token type per period, whatever the organization has.
CREATE TABLE quotas (
    org_id     text   NOT NULL REFERENCES organizations (id),
    subject    text   NOT NULL CHECK (subject ~ '^(user|team):.+'),
    token_type text   NOT NULL,
    amount     bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (org_id, token_type, subject)
);

CREATE TABLE team_members (
    org_id  text NOT NULL REFERENCES organizations (id),
    team    text NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (org_id, team, user_id)
);
CREATE INDEX team_members_by_user ON team_members (org_id, user_id);

CREATE INDEX reservations_by_user ON reservations (org_id, token_type, user_id, created_at);

-- gw_reserve's result gains a detail column: dropped once here.
DROP FUNCTION IF EXISTS gw_reserve(text, text, bigint, text[], text, text, text, text,
                                   double precision, timestamptz, jsonb, int, int);

-- Usage reports and alert thresholds.
-- Re-applied (CREATE OR REPLACE) by every migrate, after periods.sql (see FUNCTION_FILES).

-- An organization's usage since p_since (the period) and since p_burn_since (the burn
-- window), from commit rows only, through journal_commits_by_org_time: the cost grows with
-- this organization's commits in the window, not with the journal. PL/pgSQL so that its
-- plan is cached per connection: planning a SQL function's body on every call grows with
-- the journal's partitions (about three times slower with a year of them).
CREATE OR REPLACE FUNCTION gw_usage(p_org text, p_since timestamptz, p_burn_since timestamptz,
                                    p_now timestamptz)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH commits AS (
        SELECT j.token_type, j.route, j.user_id, j.at,
               -(j.reserved_delta + j.allowance_delta + j.purchased_delta) AS charged
        FROM journal j
        WHERE j.org_id = p_org AND j.kind = 'commit'
          AND j.at >= least(p_since, p_burn_since) AND j.at <= p_now
    ), period AS (
        SELECT * FROM commits WHERE at >= p_since
    )
    SELECT jsonb_build_object(
        'used', (SELECT coalesce(jsonb_object_agg(token_type, tokens), '{}'::jsonb)
                 FROM (SELECT token_type, sum(charged) AS tokens FROM period GROUP BY 1) t),
        'burn', (SELECT coalesce(jsonb_object_agg(token_type, tokens), '{}'::jsonb)
                 FROM (SELECT token_type, sum(charged) AS tokens FROM commits
                       WHERE at >= p_burn_since GROUP BY 1) t),
        'features', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                         'route', route, 'token_type', token_type, 'tokens', tokens,
                         'requests', requests) ORDER BY tokens DESC, route), '[]'::jsonb)
                     FROM (SELECT route, token_type, sum(charged) AS tokens, count(*) AS requests
                           FROM period GROUP BY 1, 2) t),
        'users', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                      'user', user_id, 'tokens', tokens, 'requests', requests)
                      ORDER BY tokens DESC, user_id), '[]'::jsonb)
                  FROM (SELECT user_id, sum(charged) AS tokens, count(*) AS requests
                        FROM period GROUP BY 1) t),
        'daily', (SELECT coalesce(jsonb_agg(jsonb_build_object('date', day, 'tokens', tokens)
                      ORDER BY day), '[]'::jsonb)
                  FROM (SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,
                               sum(charged) AS tokens
                        FROM period GROUP BY 1) t)
    ));
END
$$;

-- Record that an organization crossed a threshold of a token type's allowance in a
-- period; true only the first time, so each threshold is announced once per period.
CREATE OR REPLACE FUNCTION gw_threshold_crossed(p_org text, p_token_type text,
        p_period_start timestamptz, p_threshold numeric, p_now timestamptz)
RETURNS boolean LANGUAGE sql AS $$
    WITH inserted AS (
        INSERT INTO threshold_events (org_id, token_type, period_start, threshold, at)
            VALUES (p_org, p_token_type, p_period_start, p_threshold, p_now)
            ON CONFLICT DO NOTHING RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM inserted)
$$;

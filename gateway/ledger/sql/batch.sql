-- Group commit, set-based: many reserves (or settlements) in one call, one transaction.
-- Re-applied (CREATE OR REPLACE) by every migrate, after gate_reserve.sql and
-- settle_sweep.sql (see FUNCTION_FILES).
--
-- Each call gets exactly the answer and the rows gw_reserve / gw_settle would give it run
-- one after another in the batch's order; what changes is the work per call. An account is
-- locked, refreshed and gated once per batch, its balance is carried from call to call in
-- memory, and its row is written once; the calls' reservations and journal rows go in as
-- one INSERT each. (Updating one account row once per call leaves a row version per call
-- that every later call in the transaction walks past: the per-call cost grew with the
-- batch.) A call the common path does not cover (an idempotency key, a quota, a new
-- account, a period ending within the batch, a refused gate, a reservation named twice)
-- runs through gw_reserve / gw_settle itself, in its place in the order.

-- The rows of the reserves that passed (calls p_k of the batch's arrays; p_id, p_from_a,
-- p_from_p: their reservations and splits, by call): one INSERT each for reservations and
-- journal, and the account's one UPDATE (the caller holds its lock and carried its balance).
CREATE OR REPLACE FUNCTION gw_reserve_write(
    p_org text, p_token_type text, p_period_start timestamptz, p_k int[], p_id uuid[],
    p_from_a bigint[], p_from_p bigint[], p_route text[], p_user text[], p_request_id text[],
    p_now timestamptz[], p_ttl_seconds double precision[], p_metadata text[], p_source text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_k), 0) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO reservations (id, org_id, token_type, amount, from_allowance, from_purchased,
            period_start, route, user_id, request_id, created_at, expires_at, metadata, source)
        SELECT p_id[k], p_org, p_token_type, p_from_a[k] + p_from_p[k], p_from_a[k],
               p_from_p[k], p_period_start, p_route[k], p_user[k], p_request_id[k], p_now[k],
               p_now[k] + make_interval(secs => p_ttl_seconds[k]), p_metadata[k]::jsonb,
               p_source[k]
        FROM unnest(p_k) AS k;
    UPDATE accounts a SET allowance = a.allowance - t.a, purchased = a.purchased - t.p,
            reserved = a.reserved + t.a + t.p, last_used_at = t.at
        FROM (SELECT sum(p_from_a[k]) AS a, sum(p_from_p[k]) AS p, max(p_now[k]) AS at
              FROM unnest(p_k) AS k) t
        WHERE a.org_id = p_org AND a.token_type = p_token_type;
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, reservation_id, route, user_id, actor, request_id)
        SELECT p_now[k], p_org, p_token_type, 'reserve', -p_from_a[k], -p_from_p[k],
               p_from_a[k] + p_from_p[k], p_id[k], p_route[k], p_user[k], p_user[k],
               p_request_id[k]
        FROM unnest(p_k) WITH ORDINALITY AS u(k, ord)
        ORDER BY u.ord;
END
$$;

-- gw_reserve for each row of the argument arrays, in their order (callers sort the calls by
-- account, so that batches lock accounts in one order). Returns one row per call, in order.
CREATE OR REPLACE FUNCTION gw_reserve_many(
    p_org text[], p_token_type text[], p_amount bigint[], p_plans text[], p_route text[],
    p_user text[], p_request_id text[], p_idempotency_key text[],
    p_ttl_seconds double precision[], p_now timestamptz[], p_metadata text[],
    p_grace_days int[], p_degrade_after_days int[], p_source text[], p_fingerprint text[]
) RETURNS TABLE (
    status text, reservation_id uuid, from_allowance bigint, from_purchased bigint,
    allowance bigint, purchased bigint, plan text, period_end timestamptz, allocated bigint,
    license_date timestamptz, detail jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(cardinality(p_org), 0);
    i int := 1;
    j int;
    k int;
    v_common boolean;
    v_acct accounts;
    v_gate record;
    v_gate_key text;
    v_key text;
    v_take_a bigint;
    v_row record;
    -- the answers, by call
    r_status text[] := array_fill(NULL::text, ARRAY[n]);
    r_id uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    r_from_a bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_from_p bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_purchased bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_plan text[] := array_fill(NULL::text, ARRAY[n]);
    r_period_end timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    r_allocated bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_license_date timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    r_detail jsonb[] := array_fill(NULL::jsonb, ARRAY[n]);
    -- the calls whose reserves passed and are not written yet
    q_k int[];
    v_latest timestamptz;
BEGIN
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_org[j + 1] = p_org[i] AND p_token_type[j + 1] = p_token_type[i] LOOP
            j := j + 1;
        END LOOP;
        -- The common path needs the account to exist with no quota on it, and every call's
        -- time to fall in its current period (else gw_reserve refreshes it, call by call).
        v_common := EXISTS (SELECT 1 FROM accounts a
                            WHERE a.org_id = p_org[i] AND a.token_type = p_token_type[i])
            AND NOT EXISTS (SELECT 1 FROM quotas q
                            WHERE q.org_id = p_org[i] AND q.token_type = p_token_type[i]);
        IF v_common THEN
            v_acct := gw_touch_account(p_org[i], p_token_type[i],
                                       (SELECT min(x) FROM unnest(p_now[i:j]) x));
            v_latest := (SELECT max(x) FROM unnest(p_now[i:j]) x);
            v_common := v_latest < v_acct.period_end;
        END IF;
        v_gate_key := NULL;
        q_k := '{}';
        FOR k IN i..j LOOP
            IF v_common AND p_idempotency_key[k] IS NULL AND p_amount[k] > 0 THEN
                -- The gate's refusals other than the balance's do not depend on the amount
                -- (no quota here), and those of the license only close with time: open at
                -- the batch's latest time, the gate is open for every call of the batch.
                v_key := concat_ws('|', p_plans[k], p_grace_days[k], p_degrade_after_days[k]);
                IF v_gate_key IS DISTINCT FROM v_key THEN
                    SELECT * INTO v_gate FROM gw_gate(
                        p_org[k], p_token_type[k], 0, string_to_array(p_plans[k], ','),
                        p_user[k], v_latest, p_grace_days[k], p_degrade_after_days[k]) g;
                    v_gate_key := v_key;
                END IF;
                IF v_gate.status = 'ok' THEN
                    IF v_acct.allowance + v_acct.purchased < p_amount[k] THEN
                        r_status[k] := 'insufficient';
                        r_from_a[k] := 0;
                        r_from_p[k] := 0;
                    ELSE
                        v_take_a := least(v_acct.allowance, p_amount[k]);
                        v_acct.allowance := v_acct.allowance - v_take_a;
                        v_acct.purchased := v_acct.purchased - (p_amount[k] - v_take_a);
                        q_k := q_k || k;
                        r_status[k] := 'ok';
                        r_id[k] := gen_random_uuid();
                        r_from_a[k] := v_take_a;
                        r_from_p[k] := p_amount[k] - v_take_a;
                    END IF;
                    r_allowance[k] := v_acct.allowance;
                    r_purchased[k] := v_acct.purchased;
                    r_plan[k] := v_gate.plan;
                    r_period_end[k] := v_acct.period_end;
                    r_allocated[k] := v_acct.allocated;
                    CONTINUE;
                END IF;
            END IF;
            -- Not the common path: write what passed so far, then gw_reserve itself.
            PERFORM gw_reserve_write(p_org[i], p_token_type[i], v_acct.period_start, q_k, r_id,
                r_from_a, r_from_p, p_route, p_user, p_request_id, p_now, p_ttl_seconds,
                p_metadata, p_source);
            q_k := '{}';
            SELECT * INTO v_row FROM gw_reserve(p_org[k], p_token_type[k], p_amount[k],
                string_to_array(p_plans[k], ','), p_route[k], p_user[k], p_request_id[k],
                p_idempotency_key[k], p_ttl_seconds[k], p_now[k], p_metadata[k]::jsonb,
                p_grace_days[k], p_degrade_after_days[k], p_source[k], p_fingerprint[k]) r;
            r_status[k] := v_row.status;
            r_id[k] := v_row.reservation_id;
            r_from_a[k] := v_row.from_allowance;
            r_from_p[k] := v_row.from_purchased;
            r_allowance[k] := v_row.allowance;
            r_purchased[k] := v_row.purchased;
            r_plan[k] := v_row.plan;
            r_period_end[k] := v_row.period_end;
            r_allocated[k] := v_row.allocated;
            r_license_date[k] := v_row.license_date;
            r_detail[k] := v_row.detail;
            IF v_common THEN  -- carry on from the balance it left
                SELECT * INTO v_acct FROM accounts a
                    WHERE a.org_id = p_org[i] AND a.token_type = p_token_type[i];
            END IF;
        END LOOP;
        PERFORM gw_reserve_write(p_org[i], p_token_type[i], v_acct.period_start, q_k, r_id,
            r_from_a, r_from_p, p_route, p_user, p_request_id, p_now, p_ttl_seconds,
            p_metadata, p_source);
        i := j + 1;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(r_status, r_id, r_from_a, r_from_p, r_allowance,
        r_purchased, r_plan, r_period_end, r_allocated, r_license_date, r_detail);
END
$$;

-- gw_settle for each row of the argument arrays, as if one after another in their order.
-- Returns one row per call, in order. The transaction waits for its WAL flush when any
-- call is a commit (see gw_settle: only refunds and expiries may be lost to a crash).
CREATE OR REPLACE FUNCTION gw_settle_many(
    p_id uuid[], p_outcome text[], p_charged bigint[], p_now timestamptz[], p_actor text[],
    p_reason text[], p_org text[], p_source text[], p_usage text[]
) RETURNS TABLE (status text, charged bigint, allowance bigint, purchased bigint,
                 token_type text, org_id text, allocated bigint, period_start timestamptz,
                 unbilled bigint)
LANGUAGE plpgsql
-- A batch names its reservations by primary key: never a scan or a hash of the whole
-- table, whatever the statistics said when the plans were cached (a new table's say
-- "tiny", and a plan that scans it stays cached while it grows).
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    n int := coalesce(cardinality(p_id), 0);
    v_flush text := current_setting('synchronous_commit');
    k int;
    rec record;
    v_row record;
    v_group record;
    v_acct accounts;
    v_seen accounts;
    v_locked accounts;
    v_early boolean;
    v_usage boolean := EXISTS (SELECT 1 FROM unnest(p_usage) x WHERE x IS NOT NULL);
    v_moved_a bigint;
    v_moved_p bigint;
    v_charged bigint;
    v_split record;
    r_status text[] := array_fill(NULL::text, ARRAY[n]);
    r_charged bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_allowance bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_purchased bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_token_type text[] := array_fill(NULL::text, ARRAY[n]);
    r_org text[] := array_fill(NULL::text, ARRAY[n]);
    r_allocated bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    r_period_start timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    r_unbilled bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    -- the settlements of the current account not written yet: the call, what it charged
    -- and left unbilled, what it gave back to allowance and purchased, its reason
    q_k int[] := '{}';
    q_charged bigint[] := '{}';
    q_unbilled bigint[] := '{}';
    q_a bigint[] := '{}';
    q_p bigint[] := '{}';
    q_reason text[] := '{}';
    -- and the allowance they let lapse: the call, the amount, the reason
    l_k int[] := '{}';
    l_amount bigint[] := '{}';
    l_reason text[] := '{}';
    -- the calls whose answers show the account's balance
    g_k int[];
BEGIN
    IF (SELECT count(DISTINCT x) FROM unnest(p_id) x) < n OR n = 0 THEN
        -- A reservation named twice: its second settlement must see its first, so each
        -- call is run alone, in order.
        FOR k IN 1..n LOOP
            SELECT * INTO v_row FROM gw_settle(p_id[k], p_outcome[k], p_charged[k], p_now[k],
                p_actor[k], p_reason[k], p_org[k], p_source[k], p_usage[k]::jsonb) s;
            r_status[k] := v_row.status; r_charged[k] := v_row.charged;
            r_allowance[k] := v_row.allowance; r_purchased[k] := v_row.purchased;
            r_token_type[k] := v_row.token_type; r_org[k] := v_row.org_id;
            r_allocated[k] := v_row.allocated; r_period_start[k] := v_row.period_start;
            r_unbilled[k] := v_row.unbilled;
        END LOOP;
    ELSE
        PERFORM 1 FROM reservations r WHERE r.id = ANY (p_id) ORDER BY r.id FOR UPDATE OF r;
        -- Calls of different accounts commute: taken account by account (in one order, as
        -- the reserves lock them), in the batch's order within each account.
        FOR v_group IN
            SELECT r.org_id, r.token_type, array_agg(u.ord::int ORDER BY u.ord) AS calls
            FROM unnest(p_id) WITH ORDINALITY AS u(id, ord)
            JOIN reservations r ON r.id = u.id
                AND (p_org[u.ord] IS NULL OR r.org_id = p_org[u.ord])
                AND (p_source[u.ord] IS NULL OR r.source = p_source[u.ord])
            GROUP BY r.org_id, r.token_type
            ORDER BY r.org_id, r.token_type
        LOOP
            -- The account is locked last, for its one UPDATE: a settlement only gives back
            -- what its reservation took, so its rows depend on the account's period and
            -- overdraft, not on its balance, and are written before the lock. Another
            -- batch may move the balance meanwhile; the period and the overdraft are
            -- checked under the lock (else the whole batch is run again call by call). A
            -- charge above the hold is taken from the balance: with one, the account is
            -- locked first.
            v_early := v_usage AND EXISTS (
                SELECT 1 FROM unnest(v_group.calls) AS u(k)
                JOIN reservations r ON r.id = p_id[u.k]
                WHERE p_usage[u.k] IS NOT NULL AND p_charged[u.k] > r.amount);
            IF v_early THEN
                SELECT * INTO v_acct FROM accounts a WHERE a.org_id = v_group.org_id
                    AND a.token_type = v_group.token_type FOR UPDATE;
            ELSE
                SELECT * INTO v_acct FROM accounts a WHERE a.org_id = v_group.org_id
                    AND a.token_type = v_group.token_type;
            END IF;
            v_seen := v_acct;
            q_k := '{}'; q_charged := '{}'; q_unbilled := '{}'; q_a := '{}'; q_p := '{}';
            q_reason := '{}'; l_k := '{}'; l_amount := '{}'; l_reason := '{}'; g_k := '{}';
            FOR rec IN
                SELECT u.k, r.*, r AS r FROM unnest(v_group.calls) AS u(k)
                JOIN reservations r ON r.id = p_id[u.k]
                ORDER BY u.k
            LOOP
                k := rec.k;
                r_token_type[k] := rec.token_type;
                r_org[k] := rec.org_id;
                IF rec.state <> 'held' THEN
                    r_status[k] := 'already_' || rec.state;
                    r_charged[k] := coalesce(rec.charged, 0);
                    r_allowance[k] := v_acct.allowance; r_purchased[k] := v_acct.purchased;
                    r_allocated[k] := v_acct.allocated;
                    r_period_start[k] := v_acct.period_start;
                    r_unbilled[k] := rec.unbilled;
                    g_k := g_k || k;
                    CONTINUE;
                END IF;
                v_charged := CASE WHEN p_outcome[k] = 'commit'
                                  THEN coalesce(p_charged[k], rec.amount) ELSE 0 END;
                IF v_charged < 0 OR (v_charged > rec.amount AND p_usage[k] IS NULL) THEN
                    r_status[k] := 'exceeds_amount'; r_charged[k] := v_charged;
                    r_allowance[k] := 0; r_purchased[k] := 0; r_allocated[k] := 0;
                    r_unbilled[k] := 0;
                    CONTINUE;
                END IF;
                -- gw_settle's arithmetic, on the balance carried in memory.
                SELECT * INTO v_split FROM gw_settle_split(rec.r, v_acct, v_charged) x;
                v_charged := v_split.charged;
                v_acct.allowance := v_acct.allowance + v_split.release_a - v_split.lapse
                    - v_split.paid_off - v_split.take_a;
                v_acct.overdrawn := v_acct.overdrawn - v_split.paid_off;
                v_acct.purchased := v_acct.purchased + v_split.release_p - v_split.take_p;
                v_acct.reserved := v_acct.reserved - rec.amount;
                q_k := q_k || k;
                q_charged := q_charged || v_charged;
                q_unbilled := q_unbilled || v_split.unbilled;
                q_a := q_a || (v_split.release_a - v_split.take_a);
                q_p := q_p || (v_split.release_p - v_split.take_p);
                q_reason := q_reason || coalesce(p_reason[k], v_split.reason);
                IF v_split.lapse > 0 THEN
                    l_k := l_k || k; l_amount := l_amount || v_split.lapse;
                    l_reason := l_reason
                        || ('released allowance of the period that started ' || rec.period_start);
                END IF;
                IF v_split.paid_off > 0 THEN
                    l_k := l_k || k; l_amount := l_amount || v_split.paid_off;
                    l_reason := l_reason || 'released allowance beyond what the plan now '
                        'allocates this period'::text;
                END IF;
                r_status[k] := 'ok'; r_charged[k] := v_charged;
                r_allowance[k] := v_acct.allowance; r_purchased[k] := v_acct.purchased;
                r_allocated[k] := v_acct.allocated; r_period_start[k] := v_acct.period_start;
                r_unbilled[k] := v_split.unbilled;
                g_k := g_k || k;
            END LOOP;
            PERFORM gw_settle_write(v_group.org_id, v_group.token_type, p_id, p_outcome, p_now,
                p_actor, p_usage, q_k, q_charged, q_unbilled, q_a, q_p, q_reason, l_k,
                l_amount, l_reason);
            IF NOT v_early THEN
                SELECT * INTO v_locked FROM accounts a WHERE a.org_id = v_group.org_id
                    AND a.token_type = v_group.token_type FOR UPDATE;
                IF v_locked.period_start <> v_seen.period_start
                        OR v_locked.overdrawn <> v_seen.overdrawn THEN
                    RAISE EXCEPTION 'settle batch: account %/% changed period or overdraft',
                        v_group.org_id, v_group.token_type
                        USING ERRCODE = 'serialization_failure';
                END IF;
                -- What other transactions moved meanwhile, added to every answer.
                v_moved_a := v_locked.allowance - v_seen.allowance;
                v_moved_p := v_locked.purchased - v_seen.purchased;
                v_acct.allowance := v_acct.allowance + v_moved_a;
                v_acct.purchased := v_acct.purchased + v_moved_p;
                v_acct.reserved := v_acct.reserved + v_locked.reserved - v_seen.reserved;
                v_acct.allocated := v_locked.allocated;
                IF v_moved_a <> 0 OR v_moved_p <> 0 OR v_locked.allocated <> v_seen.allocated THEN
                    FOREACH k IN ARRAY g_k LOOP
                        r_allowance[k] := r_allowance[k] + v_moved_a;
                        r_purchased[k] := r_purchased[k] + v_moved_p;
                        r_allocated[k] := v_locked.allocated;
                    END LOOP;
                END IF;
            END IF;
            UPDATE accounts a SET allowance = v_acct.allowance, overdrawn = v_acct.overdrawn,
                    purchased = v_acct.purchased, reserved = v_acct.reserved
                WHERE a.org_id = v_group.org_id AND a.token_type = v_group.token_type;
        END LOOP;
        FOR k IN 1..n LOOP  -- in no group: unknown, or another organization's or source's
            IF r_status[k] IS NULL THEN
                r_status[k] := 'not_found'; r_charged[k] := 0; r_allowance[k] := 0;
                r_purchased[k] := 0; r_allocated[k] := 0; r_unbilled[k] := 0;
            END IF;
        END LOOP;
    END IF;
    IF 'commit' = ANY (p_outcome) THEN
        PERFORM set_config('synchronous_commit', v_flush, true);
    ELSE
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY SELECT * FROM unnest(r_status, r_charged, r_allowance, r_purchased,
        r_token_type, r_org, r_allocated, r_period_start, r_unbilled);
END
$$;

-- The rows of one account's settlements (calls q_k of the batch's arrays p_*): the
-- reservations' new states and the journal rows, each settlement's followed by those of
-- the allowance it let lapse (l_k), in one statement.
CREATE OR REPLACE FUNCTION gw_settle_write(
    p_org text, p_token_type text, p_id uuid[], p_outcome text[], p_now timestamptz[],
    p_actor text[], p_usage text[], q_k int[], q_charged bigint[], q_unbilled bigint[],
    q_a bigint[], q_p bigint[], q_reason text[], l_k int[], l_amount bigint[], l_reason text[]
) RETURNS void LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    IF coalesce(cardinality(q_k), 0) = 0 THEN
        RETURN;
    END IF;
    WITH settled AS (
        UPDATE reservations r SET
                state = CASE p_outcome[u.k] WHEN 'commit' THEN 'committed'
                        WHEN 'refund' THEN 'refunded' ELSE 'expired' END,
                charged = u.charged, settled_at = p_now[u.k], unbilled = u.unbilled,
                usage = coalesce(p_usage[u.k]::jsonb, r.usage)
            FROM unnest(q_k, q_charged, q_unbilled, q_a, q_p, q_reason)
                 AS u(k, charged, unbilled, a, p, reason)
            WHERE r.id = p_id[u.k]
            RETURNING u.k, r.id, r.amount, r.route, r.user_id, r.request_id, u.a, u.p,
                      u.reason, u.unbilled
    )
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, reservation_id, route, user_id, actor, reason, request_id,
            unbilled)
        SELECT p_now[x.k], p_org, p_token_type, x.kind, x.a, x.p, x.r, x.id, x.route, x.usr,
               x.actor, x.reason, x.req, x.unbilled
        FROM (
            SELECT s.k, 0 AS sub, p_outcome[s.k] AS kind, s.a, s.p, -s.amount AS r, s.id,
                   s.route, s.user_id AS usr, p_actor[s.k] AS actor, s.reason,
                   s.request_id AS req, s.unbilled
            FROM settled s
            UNION ALL
            SELECT l.k, l.ord, 'lapse', -l.amount, 0, 0, p_id[l.k], NULL, NULL, 'ledger',
                   l.reason, NULL, 0
            FROM unnest(l_k, l_amount, l_reason) WITH ORDINALITY AS l(k, amount, reason, ord)
        ) x
        ORDER BY x.k, x.sub;
END
$$;

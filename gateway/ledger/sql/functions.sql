-- The ledger's operations. Each is one server-side function so that every ledger
-- operation is one round trip and no balance is ever read, changed in Python and written
-- back. Re-applied (CREATE OR REPLACE) by every migrate. Time is always a parameter
-- (p_now) so that periods and expiry are testable with an injected clock.

-- The period containing p_now for a plan period anchored at p_anchor. Months are counted
-- from the anchor (anchor + k months), so a period anchored on the 31st ends on the last
-- day of shorter months and returns to the 31st after.
CREATE OR REPLACE FUNCTION gw_period_bounds(
    p_anchor timestamptz, p_period text, p_now timestamptz,
    OUT period_start timestamptz, OUT period_end timestamptz
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_step interval := CASE p_period
        WHEN 'month' THEN interval '1 month'
        WHEN 'week' THEN interval '7 days'
        ELSE interval '1 day' END;
    v_k int;
BEGIN
    IF p_now < p_anchor THEN
        v_k := 0;
    ELSIF p_period = 'month' THEN
        v_k := (extract(year FROM age(p_now, p_anchor)) * 12
                + extract(month FROM age(p_now, p_anchor)))::int;
    ELSE
        v_k := floor(extract(epoch FROM p_now - p_anchor) / extract(epoch FROM v_step))::int;
    END IF;
    -- age() rounds at month ends; settle k exactly.
    WHILE p_anchor + v_step * (v_k + 1) <= p_now LOOP v_k := v_k + 1; END LOOP;
    WHILE v_k > 0 AND p_anchor + v_step * v_k > p_now LOOP v_k := v_k - 1; END LOOP;
    period_start := p_anchor + v_step * v_k;
    period_end := p_anchor + v_step * (v_k + 1);
END
$$;

-- Lock an organization's account of one token type, creating it on first use and
-- refreshing it lazily when its period has ended: the unused allowance lapses and the
-- plan's allowance for the new period is granted. Purchased tokens are never touched.
-- The organization must exist (callers check).
CREATE OR REPLACE FUNCTION gw_touch_account(p_org text, p_token_type text, p_now timestamptz)
RETURNS accounts LANGUAGE plpgsql AS $$
DECLARE
    v_org organizations;
    v_period text;
    v_amount bigint;
    v_bounds record;
    v_acct accounts;
BEGIN
    SELECT * INTO v_org FROM organizations WHERE id = p_org;
    SELECT p.period, coalesce(a.amount, 0) INTO v_period, v_amount
        FROM plans p LEFT JOIN plan_allowances a ON a.plan = p.name AND a.token_type = p_token_type
        WHERE p.name = v_org.plan;
    v_period := coalesce(v_period, 'month');
    v_amount := coalesce(v_amount, 0);

    SELECT * INTO v_acct FROM accounts
        WHERE org_id = p_org AND token_type = p_token_type FOR UPDATE;
    IF NOT FOUND THEN
        v_bounds := gw_period_bounds(v_org.billing_anchor, v_period, p_now);
        INSERT INTO accounts (org_id, token_type, allowance, allocated, period_start, period_end)
            VALUES (p_org, p_token_type, v_amount, v_amount, v_bounds.period_start,
                    v_bounds.period_end)
            ON CONFLICT DO NOTHING
            RETURNING * INTO v_acct;
        IF FOUND THEN
            IF v_amount > 0 THEN
                INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, actor, reason)
                    VALUES (p_now, p_org, p_token_type, 'refresh', v_amount, 'ledger',
                            'allowance of plan ' || v_org.plan);
            END IF;
            RETURN v_acct;
        END IF;
        -- Created concurrently by another transaction: lock theirs.
        SELECT * INTO v_acct FROM accounts
            WHERE org_id = p_org AND token_type = p_token_type FOR UPDATE;
    END IF;

    IF p_now >= v_acct.period_end THEN
        v_bounds := gw_period_bounds(v_org.billing_anchor, v_period, p_now);
        IF v_acct.allowance > 0 THEN
            INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, actor, reason)
                VALUES (p_now, p_org, p_token_type, 'lapse', -v_acct.allowance, 'ledger',
                        'unused allowance of the period ending ' || v_acct.period_end);
        END IF;
        IF v_amount > 0 THEN
            INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, actor, reason)
                VALUES (p_now, p_org, p_token_type, 'refresh', v_amount, 'ledger',
                        'allowance of plan ' || v_org.plan);
        END IF;
        UPDATE accounts SET allowance = v_amount, allocated = v_amount,
                period_start = v_bounds.period_start, period_end = v_bounds.period_end
            WHERE org_id = p_org AND token_type = p_token_type
            RETURNING * INTO v_acct;
    END IF;
    RETURN v_acct;
END
$$;

-- Reserve p_amount for one request, allowance first, then purchased tokens.
-- status: ok | duplicate (same idempotency key: the earlier reservation is returned)
--       | unknown_organization | plan_forbidden | insufficient
CREATE OR REPLACE FUNCTION gw_reserve(
    p_org text, p_token_type text, p_amount bigint, p_plans text[], p_route text,
    p_user text, p_request_id text, p_idempotency_key text, p_ttl_seconds double precision,
    p_now timestamptz, p_metadata jsonb, p_grace_days int, p_degrade_after_days int
) RETURNS TABLE (
    status text, reservation_id uuid, from_allowance bigint, from_purchased bigint,
    allowance bigint, purchased bigint, plan text, period_end timestamptz, allocated bigint,
    license_date timestamptz, detail jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    v_org organizations;
    v_plan text;
    v_entitled boolean;
    v_acct accounts;
    v_res reservations;
    v_take_a bigint;
    v_quota record;
    v_spent bigint;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'reserve: amount must be positive, got %', p_amount
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT * INTO v_org FROM organizations o WHERE o.id = p_org;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_organization', NULL::uuid, 0::bigint, 0::bigint,
            0::bigint, 0::bigint, NULL::text, NULL::timestamptz, 0::bigint,
            NULL::timestamptz, NULL::jsonb;
        RETURN;
    END IF;
    v_plan := v_org.plan;
    -- The license gate. Past due: the grace period ends all AI at past_due_since + grace;
    -- before that, this token type is off from past_due_since + its degradation day.
    IF v_org.license_state IN ('suspended', 'canceled')
            OR (v_org.license_state = 'past_due'
                AND p_now >= v_org.past_due_since + make_interval(days => p_grace_days)) THEN
        RETURN QUERY SELECT 'license_suspended', NULL::uuid, 0::bigint, 0::bigint,
            0::bigint, 0::bigint, v_plan, NULL::timestamptz, 0::bigint,
            CASE WHEN v_org.license_state = 'past_due'
                 THEN v_org.past_due_since + make_interval(days => p_grace_days) END, NULL::jsonb;
        RETURN;
    END IF;
    IF v_org.license_state = 'past_due' AND p_degrade_after_days IS NOT NULL
            AND p_now >= v_org.past_due_since + make_interval(days => p_degrade_after_days) THEN
        RETURN QUERY SELECT 'feature_degraded', NULL::uuid, 0::bigint, 0::bigint,
            0::bigint, 0::bigint, v_plan, NULL::timestamptz, 0::bigint,
            v_org.past_due_since + make_interval(days => p_degrade_after_days), NULL::jsonb;
        RETURN;
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_res FROM reservations r
            WHERE r.org_id = p_org AND r.idempotency_key = p_idempotency_key;
        IF FOUND THEN
            SELECT * INTO v_acct FROM accounts a
                WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type;
            RETURN QUERY SELECT 'duplicate', v_res.id, v_res.from_allowance,
                v_res.from_purchased, v_acct.allowance, v_acct.purchased, v_plan,
                v_acct.period_end, v_acct.allocated, NULL::timestamptz, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    SELECT EXISTS (SELECT 1 FROM plan_allowances pa
                   WHERE pa.plan = v_plan AND pa.token_type = p_token_type AND pa.amount > 0)
        INTO v_entitled;
    IF p_plans IS NOT NULL AND NOT (v_plan = ANY (p_plans)) THEN
        v_entitled := false;
    END IF;
    IF NOT v_entitled THEN
        -- Not in the plan: only tokens bought or granted outright may be spent. An
        -- organization that never had any is refused access (403); one that spent them
        -- all is short of tokens (402). Checked without writing anything.
        SELECT * INTO v_acct FROM accounts a
            WHERE a.org_id = p_org AND a.token_type = p_token_type;
        IF (p_plans IS NOT NULL AND NOT (v_plan = ANY (p_plans)))
                OR NOT FOUND
                OR NOT EXISTS (SELECT 1 FROM journal j
                               WHERE j.org_id = p_org AND j.token_type = p_token_type
                                 AND j.purchased_delta > 0) THEN
            RETURN QUERY SELECT 'plan_forbidden', NULL::uuid, 0::bigint, 0::bigint,
                coalesce(v_acct.allowance, 0), coalesce(v_acct.purchased, 0), v_plan,
                v_acct.period_end, coalesce(v_acct.allocated, 0), NULL::timestamptz, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    v_acct := gw_touch_account(p_org, p_token_type, p_now);
    -- Quotas of this user and of its teams, checked under the account's lock, so that
    -- concurrent requests cannot both fit under one quota.
    FOR v_quota IN
        SELECT q.subject, q.amount FROM quotas q
        WHERE q.org_id = p_org AND q.token_type = p_token_type
          AND (q.subject = 'user:' || p_user
               OR q.subject IN (SELECT 'team:' || t.team FROM team_members t
                                WHERE t.org_id = p_org AND t.user_id = p_user))
        ORDER BY q.subject
    LOOP
        SELECT coalesce(sum(CASE r.state WHEN 'held' THEN r.amount
                                         WHEN 'committed' THEN r.charged ELSE 0 END), 0)
            INTO v_spent
            FROM reservations r
            WHERE r.org_id = p_org AND r.token_type = p_token_type
              AND r.created_at >= v_acct.period_start
              AND r.user_id IN (
                  SELECT p_user WHERE v_quota.subject LIKE 'user:%'
                  UNION ALL
                  SELECT t.user_id FROM team_members t
                  WHERE t.org_id = p_org AND 'team:' || t.team = v_quota.subject);
        IF v_spent + p_amount > v_quota.amount THEN
            RETURN QUERY SELECT 'quota_exceeded', NULL::uuid, 0::bigint, 0::bigint,
                v_acct.allowance, v_acct.purchased, v_plan, v_acct.period_end,
                v_acct.allocated, NULL::timestamptz,
                jsonb_build_object('subject', v_quota.subject, 'quota', v_quota.amount,
                                   'spent', v_spent);
            RETURN;
        END IF;
    END LOOP;
    IF v_acct.allowance + v_acct.purchased < p_amount THEN
        RETURN QUERY SELECT 'insufficient', NULL::uuid, 0::bigint, 0::bigint,
            v_acct.allowance, v_acct.purchased, v_plan, v_acct.period_end, v_acct.allocated,
            NULL::timestamptz, NULL::jsonb;
        RETURN;
    END IF;

    v_take_a := least(v_acct.allowance, p_amount);
    INSERT INTO reservations (org_id, token_type, amount, from_allowance, from_purchased,
            period_start, route, user_id, request_id, idempotency_key, created_at, expires_at,
            metadata)
        VALUES (p_org, p_token_type, p_amount, v_take_a, p_amount - v_take_a,
            v_acct.period_start, p_route, p_user, p_request_id, p_idempotency_key, p_now,
            p_now + make_interval(secs => p_ttl_seconds), p_metadata)
        RETURNING * INTO v_res;
    UPDATE accounts a SET allowance = a.allowance - v_take_a,
            purchased = a.purchased - (p_amount - v_take_a),
            reserved = a.reserved + p_amount, last_used_at = p_now
        WHERE a.org_id = p_org AND a.token_type = p_token_type
        RETURNING * INTO v_acct;
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, reservation_id, route, user_id, actor, request_id)
        VALUES (p_now, p_org, p_token_type, 'reserve', -v_take_a, -(p_amount - v_take_a),
            p_amount, v_res.id, p_route, p_user, p_user, p_request_id);
    RETURN QUERY SELECT 'ok', v_res.id, v_take_a, p_amount - v_take_a, v_acct.allowance,
        v_acct.purchased, v_plan, v_acct.period_end, v_acct.allocated, NULL::timestamptz, NULL::jsonb;
END
$$;

-- Resolve a held reservation exactly once: commit (charging p_charged <= amount and
-- releasing the rest), refund or expire (releasing everything). The charge is taken from
-- allowance first. Released allowance of a period that has since been refreshed lapses.
-- status: ok | not_found | already_committed | already_refunded | already_expired
--       | exceeds_amount
CREATE OR REPLACE FUNCTION gw_settle(
    p_id uuid, p_outcome text, p_charged bigint, p_now timestamptz, p_actor text,
    p_reason text
) RETURNS TABLE (status text, charged bigint, allowance bigint, purchased bigint,
                 token_type text, org_id text, allocated bigint, period_start timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_res reservations;
    v_acct accounts;
    v_charged bigint;
    v_charged_a bigint;
    v_release_a bigint;
    v_release_p bigint;
    v_lapse bigint := 0;
BEGIN
    SELECT * INTO v_res FROM reservations r WHERE r.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', 0::bigint, 0::bigint, 0::bigint, NULL::text,
            NULL::text, 0::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_res.state <> 'held' THEN
        SELECT * INTO v_acct FROM accounts a
            WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type;
        RETURN QUERY SELECT 'already_' || v_res.state, coalesce(v_res.charged, 0),
            v_acct.allowance, v_acct.purchased, v_res.token_type, v_res.org_id,
            v_acct.allocated, v_acct.period_start;
        RETURN;
    END IF;
    v_charged := CASE WHEN p_outcome = 'commit' THEN coalesce(p_charged, v_res.amount) ELSE 0 END;
    IF v_charged < 0 OR v_charged > v_res.amount THEN
        RETURN QUERY SELECT 'exceeds_amount', v_charged, 0::bigint, 0::bigint, v_res.token_type,
            v_res.org_id, 0::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    v_charged_a := least(v_res.from_allowance, v_charged);
    v_release_a := v_res.from_allowance - v_charged_a;
    v_release_p := v_res.from_purchased - (v_charged - v_charged_a);

    SELECT * INTO v_acct FROM accounts a
        WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type FOR UPDATE;
    IF v_acct.period_start <> v_res.period_start THEN
        v_lapse := v_release_a;
    END IF;

    UPDATE accounts a SET allowance = a.allowance + v_release_a - v_lapse,
            purchased = a.purchased + v_release_p,
            reserved = a.reserved - v_res.amount
        WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type
        RETURNING * INTO v_acct;
    UPDATE reservations r SET state = CASE p_outcome WHEN 'commit' THEN 'committed'
                WHEN 'refund' THEN 'refunded' ELSE 'expired' END,
            charged = v_charged, settled_at = p_now
        WHERE r.id = p_id;
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, reservation_id, route, user_id, actor, reason, request_id)
        VALUES (p_now, v_res.org_id, v_res.token_type, p_outcome, v_release_a, v_release_p,
            -v_res.amount, p_id, v_res.route, v_res.user_id, p_actor, p_reason,
            v_res.request_id);
    IF v_lapse > 0 THEN
        INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, reservation_id,
                actor, reason)
            VALUES (p_now, v_res.org_id, v_res.token_type, 'lapse', -v_lapse, p_id, 'ledger',
                'released allowance of the period that started ' || v_res.period_start);
    END IF;
    RETURN QUERY SELECT 'ok', v_charged, v_acct.allowance, v_acct.purchased, v_res.token_type,
        v_res.org_id, v_acct.allocated, v_acct.period_start;
END
$$;

-- Expire held reservations past their expires_at (their gateway died mid-request).
-- Any number of gateways may run this at once: SKIP LOCKED hands each row to one of them.
-- Returns one row per token type: how many reservations and tokens were expired.
CREATE OR REPLACE FUNCTION gw_expire_overdue(p_now timestamptz, p_limit int)
RETURNS TABLE (token_type text, reservations int, tokens bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_row record;
    v_types text[] := '{}';
    v_amounts bigint[] := '{}';
BEGIN
    FOR v_row IN
        SELECT r.id, r.token_type, r.amount FROM reservations r
            WHERE r.state = 'held' AND r.expires_at <= p_now
            ORDER BY r.org_id, r.token_type
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM gw_settle(v_row.id, 'expire', 0, p_now, 'sweeper',
                          'held past its expiry: the request was never settled');
        v_types := v_types || v_row.token_type;
        v_amounts := v_amounts || v_row.amount;
    END LOOP;
    RETURN QUERY SELECT u.t, count(*)::int, sum(u.a)::bigint
        FROM unnest(v_types, v_amounts) AS u(t, a) GROUP BY u.t;
END
$$;

-- Refresh every account whose period has ended, so that balances are current even for
-- organizations that make no requests. Returns how many accounts were refreshed.
CREATE OR REPLACE FUNCTION gw_refresh_overdue(p_now timestamptz, p_limit int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    v_row record;
    v_count int := 0;
BEGIN
    FOR v_row IN
        SELECT a.org_id, a.token_type FROM accounts a
            WHERE a.period_end <= p_now
            ORDER BY a.org_id, a.token_type
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM gw_touch_account(v_row.org_id, v_row.token_type, p_now);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;

-- Create an organization on a plan. status: ok | exists | unknown_plan
CREATE OR REPLACE FUNCTION gw_create_org(p_org text, p_plan text, p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_tt text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM plans WHERE name = p_plan) THEN
        RETURN 'unknown_plan';
    END IF;
    INSERT INTO organizations (id, plan, billing_anchor, created_at)
        VALUES (p_org, p_plan, p_now, p_now) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'exists';
    END IF;
    FOR v_tt IN SELECT token_type FROM plan_allowances WHERE plan = p_plan ORDER BY token_type
    LOOP
        PERFORM gw_touch_account(p_org, v_tt, p_now);
    END LOOP;
    RETURN 'ok';
END
$$;

-- Move an organization to another plan at once. The allowance is re-based in full: the
-- new plan's allowance for this period minus what was already used of allowance in it.
-- Purchased tokens are untouched. status: ok | not_found | unknown_plan | unchanged
CREATE OR REPLACE FUNCTION gw_set_plan(p_org text, p_plan text, p_now timestamptz,
                                       p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_old text;
    v_acct accounts;
    v_new bigint;
    v_allowance bigint;
    v_tt text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM plans WHERE name = p_plan) THEN
        RETURN 'unknown_plan';
    END IF;
    SELECT plan INTO v_old FROM organizations WHERE id = p_org FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_old = p_plan THEN
        RETURN 'unchanged';
    END IF;
    FOR v_tt IN SELECT a.token_type FROM accounts a WHERE a.org_id = p_org
                ORDER BY a.token_type LOOP
        v_acct := gw_touch_account(p_org, v_tt, p_now);
        SELECT coalesce((SELECT amount FROM plan_allowances
                         WHERE plan = p_plan AND token_type = v_tt), 0) INTO v_new;
        v_allowance := greatest(0, v_new - (v_acct.allocated - v_acct.allowance));
        IF v_allowance <> v_acct.allowance OR v_new <> v_acct.allocated THEN
            INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, actor, reason)
                VALUES (p_now, p_org, v_tt, 'refresh', v_allowance - v_acct.allowance,
                        p_actor, 'plan changed from ' || v_old || ' to ' || p_plan);
            UPDATE accounts SET allowance = v_allowance, allocated = v_new
                WHERE org_id = p_org AND token_type = v_tt;
        END IF;
    END LOOP;
    UPDATE organizations SET plan = p_plan WHERE id = p_org;
    FOR v_tt IN SELECT token_type FROM plan_allowances WHERE plan = p_plan ORDER BY token_type
    LOOP
        PERFORM gw_touch_account(p_org, v_tt, p_now);
    END LOOP;
    RETURN 'ok';
END
$$;

-- Add (or, for adjust, remove) tokens. p_bucket: purchased | allowance.
-- status: ok | unknown_organization | insufficient (an adjustment below zero)
CREATE OR REPLACE FUNCTION gw_grant(
    p_org text, p_token_type text, p_amount bigint, p_bucket text, p_kind text,
    p_actor text, p_reason text, p_now timestamptz
) RETURNS TABLE (status text, allowance bigint, purchased bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_acct accounts;
    v_da bigint := CASE WHEN p_bucket = 'allowance' THEN p_amount ELSE 0 END;
    v_dp bigint := CASE WHEN p_bucket = 'allowance' THEN 0 ELSE p_amount END;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = p_org) THEN
        RETURN QUERY SELECT 'unknown_organization', 0::bigint, 0::bigint;
        RETURN;
    END IF;
    v_acct := gw_touch_account(p_org, p_token_type, p_now);
    IF v_acct.allowance + v_da < 0 OR v_acct.purchased + v_dp < 0 THEN
        RETURN QUERY SELECT 'insufficient', v_acct.allowance, v_acct.purchased;
        RETURN;
    END IF;
    UPDATE accounts a SET allowance = a.allowance + v_da, purchased = a.purchased + v_dp
        WHERE a.org_id = p_org AND a.token_type = p_token_type
        RETURNING * INTO v_acct;
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            actor, reason)
        VALUES (p_now, p_org, p_token_type, p_kind, v_da, v_dp, p_actor, p_reason);
    RETURN QUERY SELECT 'ok', v_acct.allowance, v_acct.purchased;
END
$$;

-- An organization's balances, refreshed to p_now, one row per token type it has an
-- account for or its plan grants.
CREATE OR REPLACE FUNCTION gw_balances(p_org text, p_now timestamptz)
RETURNS SETOF accounts LANGUAGE plpgsql AS $$
DECLARE
    v_tt text;
BEGIN
    FOR v_tt IN
        SELECT a.token_type FROM accounts a WHERE a.org_id = p_org
        UNION
        SELECT pa.token_type FROM plan_allowances pa JOIN organizations o ON o.plan = pa.plan
            WHERE o.id = p_org
        ORDER BY 1
    LOOP
        RETURN NEXT gw_touch_account(p_org, v_tt, p_now);
    END LOOP;
END
$$;

-- Shadow mode: what would reserving p_amount answer now, and a journal row that records
-- the would-be charge (p_charged: the cost when the upstream answered 2xx, else 0) while
-- moving nothing. status: ok | unknown_organization | plan_forbidden | insufficient
-- With p_journal false nothing is written: `gateway rules explain` asks this way.
CREATE OR REPLACE FUNCTION gw_shadow(
    p_org text, p_token_type text, p_amount bigint, p_charged bigint, p_plans text[],
    p_route text, p_user text, p_request_id text, p_now timestamptz, p_journal boolean
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_plan text;
    v_status text := 'ok';
    v_acct accounts;
    v_entitled boolean;
BEGIN
    SELECT o.plan INTO v_plan FROM organizations o WHERE o.id = p_org;
    IF NOT FOUND THEN
        RETURN 'unknown_organization';
    END IF;
    SELECT EXISTS (SELECT 1 FROM plan_allowances pa
                   WHERE pa.plan = v_plan AND pa.token_type = p_token_type AND pa.amount > 0)
        INTO v_entitled;
    SELECT * INTO v_acct FROM accounts a WHERE a.org_id = p_org AND a.token_type = p_token_type;
    IF (p_plans IS NOT NULL AND NOT (v_plan = ANY (p_plans)))
            OR (NOT v_entitled AND NOT EXISTS (
                SELECT 1 FROM journal j WHERE j.org_id = p_org
                    AND j.token_type = p_token_type AND j.purchased_delta > 0)) THEN
        v_status := 'plan_forbidden';
    ELSIF NOT FOUND OR v_acct.allowance + v_acct.purchased < p_amount THEN
        -- An account not created yet would be: the plan's allowance is checked lazily.
        IF NOT FOUND AND v_entitled AND (SELECT pa.amount FROM plan_allowances pa
                WHERE pa.plan = v_plan AND pa.token_type = p_token_type) >= p_amount THEN
            v_status := 'ok';
        ELSE
            v_status := 'insufficient';
        END IF;
    END IF;
    IF NOT p_journal THEN
        RETURN v_status;
    END IF;
    INSERT INTO journal (at, org_id, token_type, kind, shadow_amount, route, user_id, actor,
            reason, request_id)
        VALUES (p_now, p_org, p_token_type, 'shadow', p_charged, p_route, p_user, p_user,
            'shadow: the reserve would answer ' || v_status, p_request_id);
    RETURN v_status;
END
$$;

-- An organization's usage since p_since (the period) and since p_burn_since (the burn
-- window), from commit rows only, through journal_commits_by_org_time: the cost grows with
-- this organization's commits in the window, not with the journal.
CREATE OR REPLACE FUNCTION gw_usage(p_org text, p_since timestamptz, p_burn_since timestamptz,
                                    p_now timestamptz)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    WITH commits AS (
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
    )
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

-- Set an organization's license state. Entering past_due starts the grace clock (kept if
-- it was already past due); any other state clears it. The action is recorded with its
-- actor. status: ok | not_found | unchanged
CREATE OR REPLACE FUNCTION gw_set_license(p_org text, p_state text, p_actor text,
                                          p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_old text;
BEGIN
    SELECT license_state INTO v_old FROM organizations WHERE id = p_org FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_old = p_state THEN
        RETURN 'unchanged';
    END IF;
    UPDATE organizations SET license_state = p_state,
            past_due_since = CASE WHEN p_state = 'past_due' THEN p_now END
        WHERE id = p_org;
    INSERT INTO admin_actions (at, org_id, actor, action, detail)
        VALUES (p_now, p_org, p_actor, 'set_license',
                jsonb_build_object('from', v_old, 'to', p_state));
    RETURN 'ok';
END
$$;

-- Set (p_amount not null) or clear a quota. p_subject: 'user:<id>' or 'team:<name>'.
-- status: ok | unknown_organization
CREATE OR REPLACE FUNCTION gw_set_quota(p_org text, p_subject text, p_token_type text,
                                        p_amount bigint, p_actor text, p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = p_org) THEN
        RETURN 'unknown_organization';
    END IF;
    IF p_amount IS NULL THEN
        DELETE FROM quotas WHERE org_id = p_org AND subject = p_subject
            AND token_type = p_token_type;
    ELSE
        INSERT INTO quotas (org_id, subject, token_type, amount)
            VALUES (p_org, p_subject, p_token_type, p_amount)
            ON CONFLICT (org_id, token_type, subject) DO UPDATE SET amount = EXCLUDED.amount;
    END IF;
    INSERT INTO admin_actions (at, org_id, actor, action, detail)
        VALUES (p_now, p_org, p_actor, 'set_quota', jsonb_build_object(
            'subject', p_subject, 'token_type', p_token_type, 'amount', p_amount));
    RETURN 'ok';
END
$$;

-- Make a team's members exactly p_users. status: ok | unknown_organization
CREATE OR REPLACE FUNCTION gw_set_team(p_org text, p_team text, p_users text[],
                                       p_actor text, p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = p_org) THEN
        RETURN 'unknown_organization';
    END IF;
    DELETE FROM team_members WHERE org_id = p_org AND team = p_team;
    INSERT INTO team_members (org_id, team, user_id)
        SELECT p_org, p_team, u FROM unnest(p_users) AS u ON CONFLICT DO NOTHING;
    INSERT INTO admin_actions (at, org_id, actor, action, detail)
        VALUES (p_now, p_org, p_actor, 'set_team',
                jsonb_build_object('team', p_team, 'users', to_jsonb(p_users)));
    RETURN 'ok';
END
$$;

-- Give back the charge of a committed reservation, once, as an adjust entry crediting the
-- purchased bucket (purchased tokens never lapse, whatever period the charge was in).
-- status: ok | not_found | not_committed | already_refunded | nothing_charged
CREATE OR REPLACE FUNCTION gw_refund_charge(p_id uuid, p_actor text, p_reason text,
                                            p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_res reservations;
BEGIN
    SELECT * INTO v_res FROM reservations WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    ELSIF v_res.state <> 'committed' THEN
        RETURN 'not_committed';
    ELSIF v_res.charge_refunded_at IS NOT NULL THEN
        RETURN 'already_refunded';
    ELSIF coalesce(v_res.charged, 0) = 0 THEN
        RETURN 'nothing_charged';
    END IF;
    PERFORM 1 FROM accounts
        WHERE org_id = v_res.org_id AND token_type = v_res.token_type FOR UPDATE;
    UPDATE accounts SET purchased = purchased + v_res.charged
        WHERE org_id = v_res.org_id AND token_type = v_res.token_type;
    UPDATE reservations SET charge_refunded_at = p_now WHERE id = p_id;
    INSERT INTO journal (at, org_id, token_type, kind, purchased_delta, reservation_id,
            route, user_id, actor, reason)
        VALUES (p_now, v_res.org_id, v_res.token_type, 'adjust', v_res.charged, p_id,
            v_res.route, v_res.user_id, p_actor, p_reason);
    INSERT INTO admin_actions (at, org_id, actor, action, detail)
        VALUES (p_now, v_res.org_id, p_actor, 'refund_charge',
                jsonb_build_object('reservation', p_id, 'tokens', v_res.charged,
                                   'reason', p_reason));
    RETURN 'ok';
END
$$;

-- Apply one Stripe event to an organization, exactly once per event id, in one
-- transaction with the record of it. p_action: purchase (credit p_amount p_token_type
-- tokens to the purchased bucket), license (set p_state), plan (set p_plan).
-- License and plan changes older than the last applied billing event are ignored.
-- status: ok | duplicate | stale | unknown_organization | unknown_plan
CREATE OR REPLACE FUNCTION gw_stripe_apply(
    p_event_id text, p_type text, p_org text, p_customer text, p_action text,
    p_token_type text, p_amount bigint, p_state text, p_plan text,
    p_event_at timestamptz, p_now timestamptz
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_org organizations;
    v_status text := 'ok';
    v_result record;
BEGIN
    INSERT INTO stripe_events (id, type, org_id, received_at, outcome)
        VALUES (p_event_id, p_type, p_org, p_now, 'pending')
        ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    SELECT * INTO v_org FROM organizations
        WHERE id = p_org OR (p_org IS NULL AND stripe_customer = p_customer) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        v_status := 'unknown_organization';
    ELSE
        IF p_customer IS NOT NULL AND v_org.stripe_customer IS NULL THEN
            UPDATE organizations SET stripe_customer = p_customer WHERE id = v_org.id;
        END IF;
        IF p_action = 'purchase' THEN
            SELECT * INTO v_result FROM gw_grant(v_org.id, p_token_type, p_amount, 'purchased',
                'purchase', 'stripe', 'Stripe ' || p_type || ' ' || p_event_id, p_now);
            v_status := v_result.status;
        ELSIF v_org.billing_event_at IS NOT NULL AND p_event_at < v_org.billing_event_at THEN
            v_status := 'stale';
        ELSIF p_action = 'license' THEN
            PERFORM gw_set_license(v_org.id, p_state, 'stripe', p_now);
            UPDATE organizations SET billing_event_at = p_event_at WHERE id = v_org.id;
        ELSIF p_action IN ('plan', 'cancel') THEN
            v_status := gw_set_plan(v_org.id, p_plan, p_now, 'stripe');
            IF v_status IN ('ok', 'unchanged') THEN
                v_status := 'ok';
                IF p_action = 'cancel' THEN
                    PERFORM gw_set_license(v_org.id, 'canceled', 'stripe', p_now);
                END IF;
                UPDATE organizations SET billing_event_at = p_event_at WHERE id = v_org.id;
            END IF;
        END IF;
    END IF;
    UPDATE stripe_events SET outcome = v_status, org_id = coalesce(v_org.id, p_org)
        WHERE id = p_event_id;
    RETURN v_status;
END
$$;

-- The gate and the reserve: may this caller spend this now, and the hold itself.
-- Re-applied (CREATE OR REPLACE) by every migrate, after periods.sql (see FUNCTION_FILES).

-- The gate: may p_user of p_org spend p_amount of p_token_type now, on a route open to
-- p_plans (NULL: every plan)? It writes and locks nothing (STABLE), so anything may ask:
-- shadow mode, `rules explain`, check-balance `check`. gw_reserve asks it too, under the
-- account's lock after the lazy refresh, so quotas and balance are judged there as the
-- hold is taken. An account not created yet, or whose period has ended, is judged as the
-- refresh would make it (gw_account_view), so that this answer and the reserve's agree.
-- status: ok | unknown_organization | license_suspended | feature_degraded
--       | plan_forbidden | quota_exceeded | insufficient
-- allowance, purchased, allocated, period_end: the account at p_now; license_date: when
-- the license gate closed (or closes) this; detail: the quota {subject, quota, spent}.
CREATE OR REPLACE FUNCTION gw_gate(
    p_org text, p_token_type text, p_amount bigint, p_plans text[], p_user text,
    p_now timestamptz, p_grace_days int, p_degrade_after_days int
) RETURNS TABLE (
    status text, allowance bigint, purchased bigint, plan text, period_end timestamptz,
    allocated bigint, license_date timestamptz, detail jsonb
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_org organizations;
    v_acct accounts;
    v_route_open boolean;
    v_quota record;
    v_spent bigint;
BEGIN
    SELECT * INTO v_org FROM organizations o WHERE o.id = p_org;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_organization', 0::bigint, 0::bigint, NULL::text,
            NULL::timestamptz, 0::bigint, NULL::timestamptz, NULL::jsonb;
        RETURN;
    END IF;
    -- The license gate. Past due: the grace period ends all AI at past_due_since + grace;
    -- before that, this token type is off from past_due_since + its degradation day.
    IF v_org.license_state IN ('suspended', 'canceled')
            OR (v_org.license_state = 'past_due'
                AND p_now >= v_org.past_due_since + make_interval(days => p_grace_days)) THEN
        RETURN QUERY SELECT 'license_suspended', 0::bigint, 0::bigint, v_org.plan,
            NULL::timestamptz, 0::bigint,
            CASE WHEN v_org.license_state = 'past_due'
                 THEN v_org.past_due_since + make_interval(days => p_grace_days) END,
            NULL::jsonb;
        RETURN;
    END IF;
    IF v_org.license_state = 'past_due' AND p_degrade_after_days IS NOT NULL
            AND p_now >= v_org.past_due_since + make_interval(days => p_degrade_after_days) THEN
        RETURN QUERY SELECT 'feature_degraded', 0::bigint, 0::bigint, v_org.plan,
            NULL::timestamptz, 0::bigint,
            v_org.past_due_since + make_interval(days => p_degrade_after_days), NULL::jsonb;
        RETURN;
    END IF;

    v_route_open := p_plans IS NULL OR v_org.plan = ANY (p_plans);
    IF NOT v_route_open OR NOT EXISTS (
            SELECT 1 FROM plan_allowances pa
            WHERE pa.plan = v_org.plan AND pa.token_type = p_token_type AND pa.amount > 0) THEN
        -- Not in the plan: only tokens bought or granted outright may be spent. An
        -- organization that never had any is refused access (403); one that spent them
        -- all is short of tokens (402).
        SELECT * INTO v_acct FROM accounts a
            WHERE a.org_id = p_org AND a.token_type = p_token_type;
        IF NOT v_route_open OR NOT FOUND
                OR NOT EXISTS (SELECT 1 FROM journal j
                               WHERE j.org_id = p_org AND j.token_type = p_token_type
                                 AND j.purchased_delta > 0) THEN
            RETURN QUERY SELECT 'plan_forbidden', coalesce(v_acct.allowance, 0),
                coalesce(v_acct.purchased, 0), v_org.plan, v_acct.period_end,
                coalesce(v_acct.allocated, 0), NULL::timestamptz, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    v_acct := gw_account_view(p_org, p_token_type, p_now);
    -- Quotas of this user and of its teams: what they hold or were charged this period.
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
            RETURN QUERY SELECT 'quota_exceeded', v_acct.allowance, v_acct.purchased,
                v_org.plan, v_acct.period_end, v_acct.allocated, NULL::timestamptz,
                jsonb_build_object('subject', v_quota.subject, 'quota', v_quota.amount,
                                   'spent', v_spent);
            RETURN;
        END IF;
    END LOOP;
    RETURN QUERY SELECT
        CASE WHEN v_acct.allowance + v_acct.purchased < p_amount THEN 'insufficient'
             ELSE 'ok' END,
        v_acct.allowance, v_acct.purchased, v_org.plan, v_acct.period_end, v_acct.allocated,
        NULL::timestamptz, NULL::jsonb;
END
$$;

-- Reserve p_amount for one request, allowance first, then purchased tokens, if the gate
-- lets it. p_source: who may settle it (proxy | api). p_fingerprint: what the caller's
-- request was, bound to p_idempotency_key by the first use of the key.
-- status: the gate's (see gw_gate)
--       | duplicate (same key, same fingerprint: the earlier reservation is returned)
--       | idempotency_key_reused (same key, another request: nothing is returned)
CREATE OR REPLACE FUNCTION gw_reserve(
    p_org text, p_token_type text, p_amount bigint, p_plans text[], p_route text,
    p_user text, p_request_id text, p_idempotency_key text, p_ttl_seconds double precision,
    p_now timestamptz, p_metadata jsonb, p_grace_days int, p_degrade_after_days int,
    p_source text, p_fingerprint text
) RETURNS TABLE (
    status text, reservation_id uuid, from_allowance bigint, from_purchased bigint,
    allowance bigint, purchased bigint, plan text, period_end timestamptz, allocated bigint,
    license_date timestamptz, detail jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    v_gate record;
    v_acct accounts;
    v_res reservations;
    v_take_a bigint;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'reserve: amount must be positive, got %', p_amount
            USING ERRCODE = 'check_violation';
    END IF;
    -- Refusals that do not depend on the balance come before anything is locked or
    -- written: no account is created for a token type outside the plan. An account that
    -- exists already is judged once, under its lock below (the same gate, the same
    -- refusals): the common case pays for one gate, not two.
    IF p_idempotency_key IS NOT NULL OR NOT EXISTS (
            SELECT 1 FROM accounts a WHERE a.org_id = p_org AND a.token_type = p_token_type) THEN
        SELECT * INTO v_gate FROM gw_gate(p_org, p_token_type, p_amount, p_plans, p_user,
                                          p_now, p_grace_days, p_degrade_after_days) g;
        IF v_gate.status IN ('unknown_organization', 'license_suspended', 'feature_degraded',
                             'plan_forbidden') THEN
            RETURN QUERY SELECT v_gate.status, NULL::uuid, 0::bigint, 0::bigint,
                v_gate.allowance, v_gate.purchased, v_gate.plan, v_gate.period_end,
                v_gate.allocated, v_gate.license_date, v_gate.detail;
            RETURN;
        END IF;
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        -- Concurrent first uses of one key queue here, so the later ones find the first
        -- one's reservation instead of failing on the unique index.
        PERFORM pg_advisory_xact_lock(
            hashtextextended('gw_reserve:' || p_org || ':' || p_idempotency_key, 0));
        SELECT * INTO v_res FROM reservations r
            WHERE r.org_id = p_org AND r.idempotency_key = p_idempotency_key;
        IF FOUND THEN
            IF v_res.idempotency_fingerprint IS DISTINCT FROM p_fingerprint THEN
                RETURN QUERY SELECT 'idempotency_key_reused', NULL::uuid, 0::bigint,
                    0::bigint, 0::bigint, 0::bigint, v_gate.plan, NULL::timestamptz,
                    0::bigint, NULL::timestamptz, NULL::jsonb;
                RETURN;
            END IF;
            SELECT * INTO v_acct FROM accounts a
                WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type;
            RETURN QUERY SELECT 'duplicate', v_res.id, v_res.from_allowance,
                v_res.from_purchased, v_acct.allowance, v_acct.purchased, v_gate.plan,
                v_acct.period_end, v_acct.allocated, NULL::timestamptz, NULL::jsonb;
            RETURN;
        END IF;
    END IF;

    -- Under the account's lock, refreshed: concurrent requests cannot both fit under one
    -- quota or one balance.
    v_acct := gw_touch_account(p_org, p_token_type, p_now);
    SELECT * INTO v_gate FROM gw_gate(p_org, p_token_type, p_amount, p_plans, p_user, p_now,
                                      p_grace_days, p_degrade_after_days) g;
    IF v_gate.status <> 'ok' THEN
        RETURN QUERY SELECT v_gate.status, NULL::uuid, 0::bigint, 0::bigint,
            v_gate.allowance, v_gate.purchased, v_gate.plan, v_gate.period_end,
            v_gate.allocated, v_gate.license_date, v_gate.detail;
        RETURN;
    END IF;

    v_take_a := least(v_acct.allowance, p_amount);
    INSERT INTO reservations (org_id, token_type, amount, from_allowance, from_purchased,
            period_start, route, user_id, request_id, idempotency_key, created_at, expires_at,
            metadata, source, idempotency_fingerprint)
        VALUES (p_org, p_token_type, p_amount, v_take_a, p_amount - v_take_a,
            v_acct.period_start, p_route, p_user, p_request_id, p_idempotency_key, p_now,
            p_now + make_interval(secs => p_ttl_seconds), p_metadata, p_source,
            CASE WHEN p_idempotency_key IS NOT NULL THEN p_fingerprint END)
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
        v_acct.purchased, v_gate.plan, v_acct.period_end, v_acct.allocated,
        NULL::timestamptz, NULL::jsonb;
END
$$;

-- Shadow mode: the gate's answer for reserving p_amount now, and a journal row that
-- records it and the would-be charge (p_charged: the cost when the upstream answered 2xx,
-- else 0) while moving nothing. Returns the gate's status (see gw_gate); an unknown
-- organization is not journaled. With p_journal false nothing is written.
CREATE OR REPLACE FUNCTION gw_shadow(
    p_org text, p_token_type text, p_amount bigint, p_charged bigint, p_plans text[],
    p_route text, p_user text, p_request_id text, p_now timestamptz, p_journal boolean,
    p_grace_days int, p_degrade_after_days int
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    SELECT g.status INTO v_status FROM gw_gate(p_org, p_token_type, p_amount, p_plans, p_user,
                                               p_now, p_grace_days, p_degrade_after_days) g;
    IF v_status = 'unknown_organization' OR NOT p_journal THEN
        RETURN v_status;
    END IF;
    INSERT INTO journal (at, org_id, token_type, kind, shadow_amount, route, user_id, actor,
            reason, request_id)
        VALUES (p_now, p_org, p_token_type, 'shadow', p_charged, p_route, p_user, p_user,
            'shadow: the reserve would answer ' || v_status, p_request_id);
    RETURN v_status;
END
$$;

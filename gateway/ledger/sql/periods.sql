-- Periods and the lazy refresh of an account: every other file builds on these.
-- Each ledger operation is one server-side function, so that every operation is one round
-- trip and no balance is read, changed in Python and written back. Re-applied (CREATE OR
-- REPLACE) by every migrate, in the order of FUNCTION_FILES in ledger.py. Time is always a
-- parameter (p_now) so that periods and expiry are testable with an injected clock.

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
        UPDATE accounts SET allowance = v_amount, allocated = v_amount, overdrawn = 0,
                period_start = v_bounds.period_start, period_end = v_bounds.period_end
            WHERE org_id = p_org AND token_type = p_token_type
            RETURNING * INTO v_acct;
    END IF;
    RETURN v_acct;
END
$$;

-- An organization's account of one token type as gw_touch_account would leave it at p_now
-- (created with the plan's allowance, or refreshed into the current period), without
-- writing or locking anything: what the write-free gate judges by. The organization must
-- exist (callers check).
CREATE OR REPLACE FUNCTION gw_account_view(p_org text, p_token_type text, p_now timestamptz)
RETURNS accounts LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_org organizations;
    v_period text;
    v_amount bigint;
    v_bounds record;
    v_acct accounts;
    v_exists boolean;
BEGIN
    SELECT * INTO v_acct FROM accounts a
        WHERE a.org_id = p_org AND a.token_type = p_token_type;
    v_exists := FOUND;
    IF v_exists AND p_now < v_acct.period_end THEN
        RETURN v_acct;
    END IF;
    SELECT * INTO v_org FROM organizations o WHERE o.id = p_org;
    SELECT p.period, coalesce(pa.amount, 0) INTO v_period, v_amount
        FROM plans p LEFT JOIN plan_allowances pa
            ON pa.plan = p.name AND pa.token_type = p_token_type
        WHERE p.name = v_org.plan;
    v_amount := coalesce(v_amount, 0);
    v_bounds := gw_period_bounds(v_org.billing_anchor, coalesce(v_period, 'month'), p_now);
    IF NOT v_exists THEN
        v_acct.org_id := p_org;
        v_acct.token_type := p_token_type;
        v_acct.purchased := 0;
        v_acct.reserved := 0;
    END IF;
    v_acct.allowance := v_amount;
    v_acct.allocated := v_amount;
    v_acct.overdrawn := 0;
    v_acct.period_start := v_bounds.period_start;
    v_acct.period_end := v_bounds.period_end;
    RETURN v_acct;
END
$$;

-- Organizations: creation, plan, grants, balances, license, quotas and teams.
-- Re-applied (CREATE OR REPLACE) by every migrate, after periods.sql (see FUNCTION_FILES).

-- Open (or refresh) an organization's account of every token type its plan allows, in
-- token-type order (the order every function locks accounts in).
CREATE OR REPLACE FUNCTION gw_open_plan_accounts(p_org text, p_plan text, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM gw_touch_account(p_org, pa.token_type, p_now)
        FROM plan_allowances pa WHERE pa.plan = p_plan ORDER BY pa.token_type;
END
$$;

-- Create an organization on a plan. status: ok | exists | unknown_plan
CREATE OR REPLACE FUNCTION gw_create_org(p_org text, p_plan text, p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM plans WHERE name = p_plan) THEN
        RETURN 'unknown_plan';
    END IF;
    INSERT INTO organizations (id, plan, billing_anchor, created_at)
        VALUES (p_org, p_plan, p_now, p_now) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'exists';
    END IF;
    PERFORM gw_open_plan_accounts(p_org, p_plan, p_now);
    RETURN 'ok';
END
$$;

-- Move an organization to another plan at once. The allowance is re-based in full: the
-- new plan's allowance for this period minus what was already used of allowance in it,
-- charged or still held. What was used beyond the new allowance is recorded as overdrawn,
-- so that allowance released later by the holds lapses instead of coming back (gw_settle):
-- whatever was held at the time, the allowance never exceeds what the new plan allows.
-- Purchased tokens are untouched. status: ok | not_found | unknown_plan | unchanged
CREATE OR REPLACE FUNCTION gw_set_plan(p_org text, p_plan text, p_now timestamptz,
                                       p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_old text;
    v_acct accounts;
    v_new bigint;
    v_allowance bigint;
    v_used bigint;
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
        v_used := v_acct.allocated - v_acct.allowance + v_acct.overdrawn;
        v_allowance := greatest(0, v_new - v_used);
        IF v_allowance <> v_acct.allowance OR v_new <> v_acct.allocated THEN
            INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, actor, reason)
                VALUES (p_now, p_org, v_tt, 'refresh', v_allowance - v_acct.allowance,
                        p_actor, 'plan changed from ' || v_old || ' to ' || p_plan);
        END IF;
        UPDATE accounts SET allowance = v_allowance, allocated = v_new,
                overdrawn = greatest(0, v_used - v_new)
            WHERE org_id = p_org AND token_type = v_tt;
    END LOOP;
    UPDATE organizations SET plan = p_plan WHERE id = p_org;
    PERFORM gw_open_plan_accounts(p_org, p_plan, p_now);
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

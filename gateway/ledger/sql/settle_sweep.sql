-- Settling reservations (commit, refund, expire), the sweepers, and giving a settled
-- charge back.
-- Re-applied (CREATE OR REPLACE) by every migrate, after periods.sql (see FUNCTION_FILES).

-- What settling reservation p_res with a charge of p_charged (validated: at least 0, above
-- the hold only when priced by usage) does to account p_acct: the charge is taken from the
-- hold's allowance first; what is released goes back to its bucket, except released
-- allowance of a period since refreshed (it lapses) or owed to an overdraft (it pays that
-- off first); a charge above the hold is taken from the balance, allowance first, never
-- below zero, and what it cannot cover is unbilled. gw_settle and gw_settle_many both
-- settle through this, so that one call and a batch cannot disagree.
CREATE OR REPLACE FUNCTION gw_settle_split(
    p_res reservations, p_acct accounts, p_charged bigint,
    OUT charged bigint, OUT release_a bigint, OUT release_p bigint, OUT lapse bigint,
    OUT paid_off bigint, OUT take_a bigint, OUT take_p bigint, OUT unbilled bigint,
    OUT excess bigint, OUT reason text
) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_charged_a bigint;
BEGIN
    excess := greatest(p_charged - p_res.amount, 0);
    charged := p_charged - excess;
    v_charged_a := least(p_res.from_allowance, charged);
    release_a := p_res.from_allowance - v_charged_a;
    release_p := p_res.from_purchased - (charged - v_charged_a);
    lapse := 0; paid_off := 0; take_a := 0; take_p := 0; unbilled := 0;
    IF p_acct.period_start <> p_res.period_start THEN
        lapse := release_a;
    ELSE
        paid_off := least(release_a, p_acct.overdrawn);
    END IF;
    IF excess > 0 THEN
        -- Nothing was released (the whole hold is charged): the rest of the charge comes
        -- from what the account has left, and what it lacks goes unbilled.
        take_a := least(excess, greatest(p_acct.allowance, 0));
        take_p := least(excess - take_a, greatest(p_acct.purchased, 0));
        unbilled := excess - take_a - take_p;
        charged := charged + take_a + take_p;
        reason := format('usage above the hold of %s: %s more taken from the balance, %s unbilled',
                         p_res.amount, take_a + take_p, unbilled);
    END IF;
END
$$;

-- Resolve a held reservation exactly once: commit (charging p_charged and releasing the
-- rest), refund or expire (releasing everything). The charge is taken from allowance first.
-- Released allowance lapses when its period has since been refreshed, and pays off the
-- account's overdrawn allowance (a move to a smaller plan) first.
-- p_charged may exceed the held amount only with p_usage (a commit priced by the usage the
-- backend reported, kept with the reservation): the excess is taken from the balance,
-- allowance first, never below zero, and what it cannot cover is recorded as unbilled.
-- p_org, p_source (NULL: any): a reservation of another organization or made through
-- another source is answered exactly as an unknown one, not_found.
-- status: ok | not_found | already_committed | already_refunded | already_expired
--       | exceeds_amount
CREATE OR REPLACE FUNCTION gw_settle(
    p_id uuid, p_outcome text, p_charged bigint, p_now timestamptz, p_actor text,
    p_reason text, p_org text, p_source text, p_usage jsonb DEFAULT NULL
) RETURNS TABLE (status text, charged bigint, allowance bigint, purchased bigint,
                 token_type text, org_id text, allocated bigint, period_start timestamptz,
                 unbilled bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_res reservations;
    v_acct accounts;
    v_charged bigint;
    v_split record;
BEGIN
    -- A refund or an expiry commits without waiting for its WAL flush: one lost in a crash
    -- leaves its reservation held, and the sweeper refunds it again at its expiry. A
    -- commit waits: the answer it pays for is only completed once the charge is durable,
    -- so a crash never leaves a delivered answer unpaid.
    IF p_outcome <> 'commit' THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT * INTO v_res FROM reservations r
        WHERE r.id = p_id AND (p_org IS NULL OR r.org_id = p_org)
          AND (p_source IS NULL OR r.source = p_source)
        FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', 0::bigint, 0::bigint, 0::bigint, NULL::text,
            NULL::text, 0::bigint, NULL::timestamptz, 0::bigint;
        RETURN;
    END IF;
    IF v_res.state <> 'held' THEN
        SELECT * INTO v_acct FROM accounts a
            WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type;
        RETURN QUERY SELECT 'already_' || v_res.state, coalesce(v_res.charged, 0),
            v_acct.allowance, v_acct.purchased, v_res.token_type, v_res.org_id,
            v_acct.allocated, v_acct.period_start, v_res.unbilled;
        RETURN;
    END IF;
    v_charged := CASE WHEN p_outcome = 'commit' THEN coalesce(p_charged, v_res.amount) ELSE 0 END;
    IF v_charged < 0 OR (v_charged > v_res.amount AND p_usage IS NULL) THEN
        RETURN QUERY SELECT 'exceeds_amount', v_charged, 0::bigint, 0::bigint, v_res.token_type,
            v_res.org_id, 0::bigint, NULL::timestamptz, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO v_acct FROM accounts a
        WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type FOR UPDATE;
    SELECT * INTO v_split FROM gw_settle_split(v_res, v_acct, v_charged) x;
    v_charged := v_split.charged;

    UPDATE accounts a SET allowance = a.allowance + v_split.release_a - v_split.lapse
                - v_split.paid_off - v_split.take_a,
            overdrawn = a.overdrawn - v_split.paid_off,
            purchased = a.purchased + v_split.release_p - v_split.take_p,
            reserved = a.reserved - v_res.amount
        WHERE a.org_id = v_res.org_id AND a.token_type = v_res.token_type
        RETURNING * INTO v_acct;
    UPDATE reservations r SET state = CASE p_outcome WHEN 'commit' THEN 'committed'
                WHEN 'refund' THEN 'refunded' ELSE 'expired' END,
            charged = v_charged, settled_at = p_now, unbilled = v_split.unbilled,
            usage = coalesce(p_usage, r.usage)
        WHERE r.id = p_id;
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, reservation_id, route, user_id, actor, reason, request_id,
            unbilled)
        VALUES (p_now, v_res.org_id, v_res.token_type, p_outcome,
            v_split.release_a - v_split.take_a, v_split.release_p - v_split.take_p,
            -v_res.amount, p_id, v_res.route, v_res.user_id, p_actor,
            coalesce(p_reason, v_split.reason),
            v_res.request_id, v_split.unbilled);
    IF v_split.lapse > 0 THEN
        INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, reservation_id,
                actor, reason)
            VALUES (p_now, v_res.org_id, v_res.token_type, 'lapse', -v_split.lapse, p_id,
                'ledger',
                'released allowance of the period that started ' || v_res.period_start);
    END IF;
    IF v_split.paid_off > 0 THEN
        INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, reservation_id,
                actor, reason)
            VALUES (p_now, v_res.org_id, v_res.token_type, 'lapse', -v_split.paid_off, p_id,
                'ledger', 'released allowance beyond what the plan now allocates this period');
    END IF;
    RETURN QUERY SELECT 'ok', v_charged, v_acct.allowance, v_acct.purchased, v_res.token_type,
        v_res.org_id, v_acct.allocated, v_acct.period_start, v_split.unbilled;
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
                          'held past its expiry: the request was never settled', NULL, NULL);
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

-- Give back the charge of a committed reservation, once, as a reversal entry crediting the
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
        VALUES (p_now, v_res.org_id, v_res.token_type, 'reversal', v_res.charged, p_id,
            v_res.route, v_res.user_id, p_actor, p_reason);
    INSERT INTO admin_actions (at, org_id, actor, action, detail)
        VALUES (p_now, v_res.org_id, p_actor, 'refund_charge',
                jsonb_build_object('reservation', p_id, 'tokens', v_res.charged,
                                   'reason', p_reason));
    RETURN 'ok';
END
$$;

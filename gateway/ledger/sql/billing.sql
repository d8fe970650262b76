-- Stripe: applying billing events exactly once.
-- Re-applied (CREATE OR REPLACE) by every migrate, after periods.sql (see FUNCTION_FILES).

-- Bring one pack to what is due of it after refunds and disputes of its payment: the share
-- of its tokens that the money refunded or disputed and not won back (together, at most
-- what was paid) stands for, rounded up. More due than taken so far: what the purchased
-- bucket still holds is taken (a journal row of kind 'adjust' naming the charge) and the
-- rest, spent already, is recorded as unbilled. Less due (a dispute won): the unbilled
-- debt is forgiven first, then tokens taken are given back (an 'adjust' row too).
-- Returns the tokens taken (negative: given back) and the unbilled change. Does nothing
-- before the pack is known. The caller holds the payment's row lock.
CREATE OR REPLACE FUNCTION gw_stripe_clawback(p_payment_intent text, p_event_id text,
                                              p_now timestamptz)
RETURNS TABLE (taken bigint, shortfall bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_pay stripe_payments;
    v_money bigint;
    v_due bigint;
    v_acct accounts;
    v_take bigint;
    v_reason text;
    v_forgiven bigint;
    v_back bigint;
BEGIN
    SELECT * INTO v_pay FROM stripe_payments WHERE payment_intent = p_payment_intent;
    IF v_pay.org_id IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    v_money := v_pay.refunded + v_pay.disputed;
    IF coalesce(v_pay.paid, 0) = 0 THEN
        -- What was paid is unknown: any refund or dispute stands for the whole pack.
        v_due := CASE WHEN v_money > 0 THEN v_pay.tokens ELSE 0 END;
    ELSE
        v_due := (v_pay.tokens * least(v_money, v_pay.paid) + v_pay.paid - 1) / v_pay.paid;
    END IF;
    v_due := v_due - v_pay.clawed_back - v_pay.unbilled;
    v_reason := format('Stripe %s: charge %s (payment %s) refunded %s and disputed %s of %s',
                       p_event_id, coalesce(v_pay.charge, '?'), v_pay.payment_intent,
                       v_pay.refunded, v_pay.disputed, coalesce(v_pay.paid::text, '?'));
    IF v_due < 0 THEN
        v_forgiven := least(-v_due, v_pay.unbilled);
        v_back := -v_due - v_forgiven;
        IF v_back > 0 THEN
            PERFORM gw_touch_account(v_pay.org_id, v_pay.token_type, p_now);
            PERFORM gw_grant(v_pay.org_id, v_pay.token_type, v_back, 'purchased', 'adjust',
                             'stripe', v_reason || ': given back', p_now);
        END IF;
        UPDATE stripe_payments SET clawed_back = clawed_back - v_back,
                                   unbilled = unbilled - v_forgiven
            WHERE payment_intent = p_payment_intent;
        RETURN QUERY SELECT -v_back, -v_forgiven;
        RETURN;
    END IF;
    IF v_due = 0 THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    v_acct := gw_touch_account(v_pay.org_id, v_pay.token_type, p_now);
    v_take := least(v_due, v_acct.purchased);
    IF v_take > 0 THEN
        PERFORM gw_grant(v_pay.org_id, v_pay.token_type, -v_take, 'purchased', 'adjust',
                         'stripe', v_reason, p_now);
    END IF;
    UPDATE stripe_payments SET clawed_back = clawed_back + v_take,
                               unbilled = unbilled + (v_due - v_take)
        WHERE payment_intent = p_payment_intent;
    INSERT INTO stripe_clawbacks (at, event_id, payment_intent, org_id, token_type,
                                  clawed_back, unbilled, reason)
        VALUES (p_now, p_event_id, p_payment_intent, v_pay.org_id, v_pay.token_type,
                v_take, v_due - v_take, v_reason);
    RETURN QUERY SELECT v_take, v_due - v_take;
END
$$;

-- Apply one Stripe event to an organization, exactly once per event id, in one
-- transaction with the record of it. p_action: purchase (credit p_amount p_token_type
-- tokens to the purchased bucket, and remember the payment p_payment_intent of p_paid),
-- license (set p_state), plan (set p_plan), cancel (set p_plan, license canceled).
-- The organization is p_org when given (the gateway wrote it into the checkout session or
-- the operator into the subscription), else the one bound to p_customer. A customer is
-- bound to the first organization it pays for and never moved: customer_org answers
-- which organization it belongs to when that is another one.
-- License events older than the last license event applied, and plan or cancel events
-- older than the last plan event applied, are ignored (stale).
-- status: ok | duplicate | stale | unknown_organization | unknown_plan
-- A purchase for an unknown organization is not recorded, so that Stripe's retry after
-- the organization is created credits it; other events are recorded as ignored.
CREATE OR REPLACE FUNCTION gw_stripe_apply(
    p_event_id text, p_type text, p_org text, p_customer text, p_action text,
    p_token_type text, p_amount bigint, p_state text, p_plan text,
    p_payment_intent text, p_paid bigint, p_event_at timestamptz, p_now timestamptz
) RETURNS TABLE (status text, org text, customer_org text) LANGUAGE plpgsql AS $$
DECLARE
    v_org organizations;
    v_customer_org text;
    v_status text := 'ok';
    v_result record;
BEGIN
    INSERT INTO stripe_events (id, type, org_id, received_at, outcome)
        VALUES (p_event_id, p_type, p_org, p_now, 'pending')
        ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'duplicate', p_org, NULL::text;
        RETURN;
    END IF;
    IF p_org IS NOT NULL THEN
        SELECT * INTO v_org FROM organizations WHERE id = p_org FOR NO KEY UPDATE;
    ELSE
        SELECT * INTO v_org FROM organizations WHERE stripe_customer = p_customer
            FOR NO KEY UPDATE;
    END IF;
    IF NOT FOUND THEN
        IF p_action = 'purchase' THEN
            DELETE FROM stripe_events WHERE id = p_event_id;
        ELSE
            UPDATE stripe_events SET outcome = 'unknown_organization' WHERE id = p_event_id;
        END IF;
        RETURN QUERY SELECT 'unknown_organization', p_org, NULL::text;
        RETURN;
    END IF;

    IF p_customer IS NOT NULL THEN
        SELECT id INTO v_customer_org FROM organizations WHERE stripe_customer = p_customer;
        IF v_customer_org IS NULL AND v_org.stripe_customer IS NULL THEN
            BEGIN
                UPDATE organizations SET stripe_customer = p_customer WHERE id = v_org.id;
                v_customer_org := v_org.id;
            EXCEPTION WHEN unique_violation THEN
                -- Bound to another organization by a concurrent event: it stays there.
                SELECT id INTO v_customer_org FROM organizations
                    WHERE stripe_customer = p_customer;
            END;
        END IF;
    END IF;

    IF p_action = 'purchase' THEN
        SELECT * INTO v_result FROM gw_grant(v_org.id, p_token_type, p_amount, 'purchased',
            'purchase', 'stripe', 'Stripe ' || p_type || ' ' || p_event_id, p_now);
        v_status := v_result.status;
        IF v_status = 'ok' AND p_payment_intent IS NOT NULL THEN
            -- A refund seen before this event left a row without its pack: complete it.
            INSERT INTO stripe_payments (payment_intent, event_id, org_id, token_type, tokens,
                                         paid)
                VALUES (p_payment_intent, p_event_id, v_org.id, p_token_type, p_amount, p_paid)
                ON CONFLICT (payment_intent) DO UPDATE
                SET event_id = excluded.event_id, org_id = excluded.org_id,
                    token_type = excluded.token_type, tokens = excluded.tokens,
                    paid = coalesce(stripe_payments.paid, excluded.paid)
                WHERE stripe_payments.org_id IS NULL;
            PERFORM gw_stripe_clawback(p_payment_intent, p_event_id, p_now);
        END IF;
    ELSIF p_action = 'license' THEN
        IF p_event_at < v_org.license_event_at THEN
            v_status := 'stale';
        ELSE
            PERFORM gw_set_license(v_org.id, p_state, 'stripe', p_now);
            UPDATE organizations SET license_event_at = p_event_at WHERE id = v_org.id;
        END IF;
    ELSIF p_action IN ('plan', 'cancel') THEN
        IF p_event_at < v_org.plan_event_at THEN
            v_status := 'stale';
        ELSE
            v_status := gw_set_plan(v_org.id, p_plan, p_now, 'stripe');
            IF v_status IN ('ok', 'unchanged') THEN
                v_status := 'ok';
                UPDATE organizations SET plan_event_at = p_event_at WHERE id = v_org.id;
                IF p_action = 'cancel' THEN
                    -- The end of the subscription is final, whatever its invoices said.
                    PERFORM gw_set_license(v_org.id, 'canceled', 'stripe', p_now);
                    UPDATE organizations
                        SET license_event_at = greatest(license_event_at, p_event_at)
                        WHERE id = v_org.id;
                END IF;
            END IF;
        END IF;
    END IF;
    UPDATE stripe_events SET outcome = v_status, org_id = v_org.id WHERE id = p_event_id;
    RETURN QUERY SELECT v_status, v_org.id, v_customer_org;
END
$$;

-- Apply one refund (p_refunded: the charge's amount_refunded so far, out of p_paid) or
-- dispute (p_dispute of p_disputed; p_won once it is won) of a payment, exactly once per
-- event id: the payment's pack loses its share, or gets it back (see gw_stripe_clawback).
-- Refunded amounts only grow and a dispute once won stays won, so Stripe's events may come
-- in any order, and a refund and a dispute of the same money take it back once.
-- status: ok | shortfall (part had been spent: unbilled) | restored (a dispute won) |
-- unchanged (nothing more due) | duplicate | unknown_payment (no payment intent to match;
-- recorded and ignored). taken and unbilled: the tokens this event took back (negative:
-- gave back) and the change of what could not be taken.
CREATE OR REPLACE FUNCTION gw_stripe_reverse(
    p_event_id text, p_type text, p_payment_intent text, p_charge text, p_paid bigint,
    p_refunded bigint, p_disputed bigint, p_now timestamptz, p_dispute text, p_won boolean
) RETURNS TABLE (status text, org text, token_type text, taken bigint, unbilled bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_pi text := p_payment_intent;
    v_pay stripe_payments;
    v_result record;
    v_status text;
BEGIN
    INSERT INTO stripe_events (id, type, org_id, received_at, outcome)
        VALUES (p_event_id, p_type, NULL, p_now, 'pending')
        ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'duplicate', NULL::text, NULL::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF v_pi IS NULL THEN
        SELECT p.payment_intent INTO v_pi FROM stripe_payments p WHERE p.charge = p_charge;
    END IF;
    IF v_pi IS NULL THEN
        UPDATE stripe_events SET outcome = 'unknown_payment' WHERE id = p_event_id;
        RETURN QUERY SELECT 'unknown_payment', NULL::text, NULL::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    -- The organization first, as gw_stripe_apply and the request path lock it: no deadlock.
    PERFORM 1 FROM organizations o JOIN stripe_payments p ON p.org_id = o.id
        WHERE p.payment_intent = v_pi FOR NO KEY UPDATE OF o;
    INSERT INTO stripe_payments AS p (payment_intent, charge, paid, refunded, disputed)
        VALUES (v_pi, p_charge, p_paid, coalesce(p_refunded, 0), coalesce(p_disputed, 0))
        ON CONFLICT (payment_intent) DO UPDATE
        SET charge = coalesce(excluded.charge, p.charge),
            paid = coalesce(excluded.paid, p.paid),
            refunded = greatest(p.refunded, excluded.refunded),
            disputed = greatest(p.disputed, excluded.disputed)
        RETURNING * INTO v_pay;
    IF p_dispute IS NOT NULL THEN
        INSERT INTO stripe_disputes AS d (id, payment_intent, amount, won)
            VALUES (p_dispute, v_pi, coalesce(p_disputed, 0), coalesce(p_won, false))
            ON CONFLICT (id) DO UPDATE
            SET amount = greatest(d.amount, excluded.amount), won = d.won OR excluded.won;
        UPDATE stripe_payments p SET disputed = (
                SELECT coalesce(sum(d.amount), 0) FROM stripe_disputes d
                WHERE d.payment_intent = v_pi AND NOT d.won)
            WHERE p.payment_intent = v_pi;
    END IF;
    SELECT * INTO v_result FROM gw_stripe_clawback(v_pi, p_event_id, p_now);
    v_status := CASE
        WHEN v_pay.org_id IS NULL THEN 'unknown_payment'
        WHEN v_result.shortfall > 0 THEN 'shortfall'
        WHEN v_result.taken > 0 THEN 'ok'
        WHEN v_result.taken < 0 OR v_result.shortfall < 0 THEN 'restored'
        ELSE 'unchanged' END;
    UPDATE stripe_events SET outcome = v_status, org_id = v_pay.org_id WHERE id = p_event_id;
    RETURN QUERY SELECT v_status, v_pay.org_id, v_pay.token_type, v_result.taken,
                        v_result.shortfall;
END
$$;

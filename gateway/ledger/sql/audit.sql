-- The ledger's invariants. Every row returned is one violation: (invariant, detail).
--
-- The journal is read from the latest checkpoint's cut on (`gateway archive`): there,
-- one 'checkpoint' row per account carries the sums of everything before the cut, so the
-- balances still equal the journal's sums to the last token. Rows before the cut are
-- archived (exported, then detached; until then ignored here); a reservation is checked
-- against the rows it has after the cut: a reserve row if it was made after it, a
-- settlement row if it was settled after it. Without a checkpoint the cut is -infinity.
WITH latest AS (
    SELECT c.id, c.cut, c.last_journal_id FROM checkpoints c ORDER BY c.cut DESC LIMIT 1
), cut AS (
    SELECT coalesce((SELECT l.cut FROM latest l), '-infinity'::timestamptz) AS at
), live AS NOT MATERIALIZED (
    SELECT j.* FROM journal j WHERE j.at >= (SELECT cut.at FROM cut)
), sums AS (
    SELECT org_id, token_type,
           sum(allowance_delta) AS allowance,
           sum(purchased_delta) AS purchased,
           sum(reserved_delta) AS reserved
    FROM live GROUP BY org_id, token_type
), held AS (
    SELECT org_id, token_type, sum(amount) AS amount
    FROM reservations WHERE state = 'held' GROUP BY org_id, token_type
), settlements AS (
    SELECT reservation_id, count(*) AS n,
           sum(-reserved_delta) FILTER (WHERE kind IN ('commit', 'refund', 'expire')) AS released
    FROM live
    WHERE reservation_id IS NOT NULL AND kind IN ('commit', 'refund', 'expire')
    GROUP BY reservation_id
), reserves AS (
    SELECT reservation_id, count(*) AS n, sum(reserved_delta) AS amount
    FROM live WHERE kind = 'reserve' GROUP BY reservation_id
), carried AS (
    SELECT b.org_id, b.token_type, b.allowance, b.purchased, b.reserved
    FROM checkpoint_balances b JOIN latest l ON b.checkpoint_id = l.id
), carried_rows AS (
    SELECT org_id, token_type, count(*) AS n, sum(allowance_delta) AS allowance,
           sum(purchased_delta) AS purchased, sum(reserved_delta) AS reserved
    FROM live WHERE kind = 'checkpoint' GROUP BY org_id, token_type
), held_across AS (
    -- What was held at the cut: made before it, settled after it (or not yet).
    SELECT r.org_id, r.token_type, sum(r.amount) AS amount
    FROM reservations r, cut
    WHERE r.created_at < cut.at AND (r.state = 'held' OR r.settled_at >= cut.at)
    GROUP BY r.org_id, r.token_type
)
SELECT 'negative_balance' AS invariant,
       format('account %s/%s: allowance %s, purchased %s, reserved %s',
              a.org_id, a.token_type, a.allowance, a.purchased, a.reserved) AS detail
FROM accounts a
WHERE a.allowance < 0 OR a.purchased < 0 OR a.reserved < 0
UNION ALL
SELECT 'journal_balance_mismatch',
       format('account %s/%s: balances (allowance %s, purchased %s, reserved %s) but journal '
              'sums (allowance %s, purchased %s, reserved %s)',
              coalesce(a.org_id, s.org_id), coalesce(a.token_type, s.token_type),
              a.allowance, a.purchased, a.reserved, s.allowance, s.purchased, s.reserved)
FROM accounts a FULL JOIN sums s USING (org_id, token_type)
WHERE (a.org_id IS NULL AND (s.allowance <> 0 OR s.purchased <> 0 OR s.reserved <> 0))
   OR (a.org_id IS NOT NULL AND (a.allowance <> coalesce(s.allowance, 0)
                                 OR a.purchased <> coalesce(s.purchased, 0)
                                 OR a.reserved <> coalesce(s.reserved, 0)))
UNION ALL
SELECT 'reserved_mismatch',
       format('account %s/%s: reserved %s but held reservations sum to %s',
              a.org_id, a.token_type, a.reserved, coalesce(h.amount, 0))
FROM accounts a LEFT JOIN held h USING (org_id, token_type)
WHERE a.reserved <> coalesce(h.amount, 0)
UNION ALL
SELECT 'tokens_moved_by_' || j.kind,
       format('journal row %s (%s, %s/%s): deltas allowance %s, purchased %s, reserved %s '
              'do not fit its kind',
              j.id, j.kind, j.org_id, j.token_type,
              j.allowance_delta, j.purchased_delta, j.reserved_delta)
FROM journal j
WHERE CASE j.kind
    -- reserve, refund and expire only move tokens between buckets
    WHEN 'reserve' THEN j.allowance_delta + j.purchased_delta + j.reserved_delta <> 0
                        OR j.reserved_delta <= 0 OR j.allowance_delta > 0
                        OR j.purchased_delta > 0 OR j.reservation_id IS NULL
    WHEN 'refund' THEN j.allowance_delta + j.purchased_delta + j.reserved_delta <> 0
                       OR j.reserved_delta >= 0 OR j.reservation_id IS NULL
    WHEN 'expire' THEN j.allowance_delta + j.purchased_delta + j.reserved_delta <> 0
                       OR j.reserved_delta >= 0 OR j.reservation_id IS NULL
    -- commit releases part of what it held and destroys the rest (the charge), or, priced
    -- by usage above its hold, destroys all it held and takes more from the balance
    WHEN 'commit' THEN j.reserved_delta >= 0 OR j.reservation_id IS NULL
                       OR NOT ((j.allowance_delta >= 0 AND j.purchased_delta >= 0
                                AND j.allowance_delta + j.purchased_delta <= -j.reserved_delta
                                AND j.unbilled = 0)
                               OR (j.allowance_delta <= 0 AND j.purchased_delta <= 0))
    -- shadow rows record a would-be charge and move nothing
    WHEN 'shadow' THEN j.allowance_delta <> 0 OR j.purchased_delta <> 0 OR j.reserved_delta <> 0
    -- reversal gives a committed charge back into purchased, naming its reservation
    WHEN 'reversal' THEN j.allowance_delta <> 0 OR j.purchased_delta <= 0
                         OR j.reserved_delta <> 0 OR j.reservation_id IS NULL
    -- checkpoint carries an account's sums across a cut (checked against the checkpoint)
    WHEN 'checkpoint' THEN j.reservation_id IS NOT NULL
                           OR NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.cut = j.at)
    -- lapse destroys allowance only
    WHEN 'lapse' THEN j.allowance_delta >= 0 OR j.purchased_delta <> 0 OR j.reserved_delta <> 0
    -- grant, refresh, purchase and adjust never touch what is reserved
    ELSE j.reserved_delta <> 0
         OR (j.kind IN ('grant', 'purchase') AND (j.allowance_delta < 0 OR j.purchased_delta < 0))
END
UNION ALL
SELECT 'reservation_journal_mismatch',
       format('reservation %s (%s, amount %s): %s reserve row(s) for %s, %s settlement row(s) '
              'releasing %s',
              r.id, r.state, r.amount, coalesce(rv.n, 0), rv.amount, coalesce(st.n, 0),
              st.released)
FROM reservations r
CROSS JOIN cut
LEFT JOIN reserves rv ON rv.reservation_id = r.id
LEFT JOIN settlements st ON st.reservation_id = r.id
WHERE coalesce(rv.n, 0) <> (r.created_at >= cut.at)::int
   OR (r.created_at >= cut.at AND rv.amount <> r.amount)
   OR coalesce(st.n, 0) <> coalesce(r.state <> 'held' AND r.settled_at >= cut.at, false)::int
   OR (r.state <> 'held' AND r.settled_at >= cut.at AND st.released <> r.amount)
UNION ALL
SELECT 'charge_mismatch',
       format('reservation %s: charged %s (%s unbilled) but its commit row destroyed %s '
              '(%s unbilled)', r.id, r.charged, r.unbilled,
              -(j.reserved_delta + j.allowance_delta + j.purchased_delta), j.unbilled)
FROM reservations r JOIN live j ON j.reservation_id = r.id AND j.kind = 'commit'
WHERE r.charged <> -(j.reserved_delta + j.allowance_delta + j.purchased_delta)
   OR r.unbilled <> j.unbilled
UNION ALL
SELECT 'reversal_mismatch',
       format('reservation %s (%s, charged %s, charge refunded %s): %s reversal row(s) '
              'returning %s', r.id, r.state, r.charged, r.charge_refunded_at IS NOT NULL,
              count(j.id), coalesce(sum(j.purchased_delta), 0))
FROM reservations r CROSS JOIN cut
LEFT JOIN live j ON j.reservation_id = r.id AND j.kind = 'reversal'
GROUP BY r.id, cut.at
HAVING count(j.id) > 1
    OR (count(j.id) = 1 AND (r.state <> 'committed' OR r.charge_refunded_at IS NULL
                             OR sum(j.purchased_delta) <> r.charged))
    OR (count(j.id) = 0 AND r.charge_refunded_at >= cut.at)
UNION ALL
SELECT 'unbilled_without_commit',
       format('reservation %s (%s): %s unbilled', r.id, r.state, r.unbilled)
FROM reservations r
WHERE r.unbilled <> 0 AND r.state <> 'committed'
UNION ALL
SELECT 'orphan_journal_row',
       format('journal row %s (%s) names reservation %s, which does not exist',
              j.id, j.kind, j.reservation_id)
FROM live j LEFT JOIN reservations r ON r.id = j.reservation_id
WHERE j.reservation_id IS NOT NULL AND r.id IS NULL
UNION ALL
SELECT 'checkpoint_mismatch',
       format('checkpoint %s (cut %s), account %s/%s: balances (allowance %s, purchased %s, '
              'reserved %s) but %s checkpoint row(s) in the journal carrying (allowance %s, '
              'purchased %s, reserved %s)',
              l.id, to_char(l.cut AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
              coalesce(b.org_id, jr.org_id), coalesce(b.token_type, jr.token_type),
              b.allowance, b.purchased, b.reserved, coalesce(jr.n, 0), jr.allowance,
              jr.purchased, jr.reserved)
FROM carried b FULL JOIN carried_rows jr USING (org_id, token_type) LEFT JOIN latest l ON true
WHERE b.org_id IS NULL OR jr.org_id IS NULL OR jr.n <> 1
   OR (b.allowance, b.purchased, b.reserved) <> (jr.allowance, jr.purchased, jr.reserved)
UNION ALL
SELECT 'checkpoint_reserved_mismatch',
       format('checkpoint %s (cut %s), account %s/%s: reserved %s but the reservations held '
              'across the cut sum to %s',
              l.id, to_char(l.cut AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
              coalesce(b.org_id, h.org_id), coalesce(b.token_type, h.token_type),
              coalesce(b.reserved, 0), coalesce(h.amount, 0))
FROM carried b FULL JOIN held_across h USING (org_id, token_type) CROSS JOIN latest l
WHERE coalesce(b.reserved, 0) <> coalesce(h.amount, 0)
UNION ALL
SELECT 'journal_row_after_checkpoint',
       format('journal row %s (%s, %s/%s at %s) was written into the period closed by '
              'checkpoint %s (cut %s) after it was taken', j.id, j.kind, j.org_id,
              j.token_type, j.at, l.id, to_char(l.cut AT TIME ZONE 'UTC', 'YYYY-MM-DD'))
FROM latest l JOIN journal j ON j.at < l.cut AND j.id > l.last_journal_id
ORDER BY 1, 2

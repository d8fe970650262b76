-- The ledger's invariants. Every row returned is one violation: (invariant, detail).
WITH sums AS (
    SELECT org_id, token_type,
           sum(allowance_delta) AS allowance,
           sum(purchased_delta) AS purchased,
           sum(reserved_delta) AS reserved
    FROM journal GROUP BY org_id, token_type
), held AS (
    SELECT org_id, token_type, sum(amount) AS amount
    FROM reservations WHERE state = 'held' GROUP BY org_id, token_type
), settlements AS (
    SELECT reservation_id, count(*) AS n,
           sum(-reserved_delta) FILTER (WHERE kind IN ('commit', 'refund', 'expire')) AS released
    FROM journal
    WHERE reservation_id IS NOT NULL AND kind IN ('commit', 'refund', 'expire')
    GROUP BY reservation_id
), reserves AS (
    SELECT reservation_id, count(*) AS n, sum(reserved_delta) AS amount
    FROM journal WHERE kind = 'reserve' GROUP BY reservation_id
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
LEFT JOIN reserves rv ON rv.reservation_id = r.id
LEFT JOIN settlements st ON st.reservation_id = r.id
WHERE coalesce(rv.n, 0) <> 1 OR rv.amount <> r.amount
   OR (r.state = 'held' AND coalesce(st.n, 0) <> 0)
   OR (r.state <> 'held' AND (coalesce(st.n, 0) <> 1 OR st.released <> r.amount))
UNION ALL
SELECT 'charge_mismatch',
       format('reservation %s: charged %s (%s unbilled) but its commit row destroyed %s '
              '(%s unbilled)', r.id, r.charged, r.unbilled,
              -(j.reserved_delta + j.allowance_delta + j.purchased_delta), j.unbilled)
FROM reservations r JOIN journal j ON j.reservation_id = r.id AND j.kind = 'commit'
WHERE r.charged <> -(j.reserved_delta + j.allowance_delta + j.purchased_delta)
   OR r.unbilled <> j.unbilled
UNION ALL
SELECT 'reversal_mismatch',
       format('reservation %s (%s, charged %s, charge refunded %s): %s reversal row(s) '
              'returning %s', r.id, r.state, r.charged, r.charge_refunded_at IS NOT NULL,
              count(j.id), coalesce(sum(j.purchased_delta), 0))
FROM reservations r LEFT JOIN journal j ON j.reservation_id = r.id AND j.kind = 'reversal'
GROUP BY r.id
HAVING count(j.id) > 1
    OR (count(j.id) = 1 AND (r.state <> 'committed' OR r.charge_refunded_at IS NULL
                             OR sum(j.purchased_delta) <> r.charged))
    OR (count(j.id) = 0 AND r.charge_refunded_at IS NOT NULL)
UNION ALL
SELECT 'unbilled_without_commit',
       format('reservation %s (%s): %s unbilled', r.id, r.state, r.unbilled)
FROM reservations r
WHERE r.unbilled <> 0 AND r.state <> 'committed'
UNION ALL
SELECT 'orphan_journal_row',
       format('journal row %s (%s) names reservation %s, which does not exist',
              j.id, j.kind, j.reservation_id)
FROM journal j LEFT JOIN reservations r ON r.id = j.reservation_id
WHERE j.reservation_id IS NOT NULL AND r.id IS NULL
ORDER BY 1, 2

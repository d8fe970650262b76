-- Shadow mode: routes with `enforce: false` are journaled without moving any balance.
-- shadow_amount is what the request would have been charged; reason says what the
-- reserve would have answered (ok, insufficient, plan_forbidden).
ALTER TABLE journal ADD COLUMN shadow_amount bigint;
ALTER TABLE journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE journal ADD CONSTRAINT journal_kind_check CHECK (kind IN (
    'grant', 'refresh', 'lapse', 'purchase', 'reserve', 'commit', 'refund', 'expire',
    'adjust', 'shadow'));
ALTER TABLE journal ADD CONSTRAINT journal_shadow_moves_nothing CHECK (
    kind <> 'shadow'
    OR (allowance_delta = 0 AND purchased_delta = 0 AND reserved_delta = 0));

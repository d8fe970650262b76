-- Giving back a committed charge (gateway refund-charge, the admin API) is its own journal
-- kind, 'reversal', rather than a generic 'adjust': the audit can then check that each
-- reversal returns exactly its reservation's charge, once, into the purchased bucket.
ALTER TABLE journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE journal ADD CONSTRAINT journal_kind_check CHECK (kind IN (
    'grant', 'refresh', 'lapse', 'purchase', 'reserve', 'commit', 'refund', 'expire',
    'adjust', 'shadow', 'reversal'));

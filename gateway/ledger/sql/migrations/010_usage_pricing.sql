-- Routes priced by what the backend reports. Their commit may charge more than the hold:
-- the excess is taken from the balance in the same settle (the commit row then takes from
-- allowance and purchased instead of releasing into them), never below zero, and what the
-- balance could not cover is recorded as unbilled, on the commit row and the reservation.
-- The backend's reported usage is kept with the reservation.
DO $$
DECLARE
    v_name text;
BEGIN
    -- 001 named it implicitly (reservations_check): found by what it says.
    SELECT c.conname INTO v_name FROM pg_constraint c
        WHERE c.conrelid = 'reservations'::regclass AND c.contype = 'c'
          AND pg_get_constraintdef(c.oid) LIKE '%charged <= amount%';
    IF v_name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE reservations DROP CONSTRAINT %I', v_name);
    END IF;
END
$$;
ALTER TABLE reservations
    ADD CONSTRAINT reservations_charged_check CHECK (charged >= 0),
    ADD COLUMN unbilled bigint NOT NULL DEFAULT 0 CHECK (unbilled >= 0),
    ADD COLUMN usage jsonb;
ALTER TABLE journal
    ADD COLUMN unbilled bigint NOT NULL DEFAULT 0 CHECK (unbilled >= 0),
    ADD CONSTRAINT journal_unbilled_on_commit CHECK (unbilled = 0 OR kind = 'commit');

-- gw_settle gains p_usage (set only by a usage-priced commit).
DROP FUNCTION IF EXISTS gw_settle(uuid, text, bigint, timestamptz, text, text, text, text);

-- An operator may give back a committed charge, once: the reservation remembers it.
ALTER TABLE reservations ADD COLUMN charge_refunded_at timestamptz;

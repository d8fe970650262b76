-- A bounded journal that stays auditable.
--
-- The journal becomes a table partitioned by the UTC month of `at`: journal_YYYY_MM, plus
-- journal_default for rows no partition covers, so that an insert never fails. Existing
-- rows move into their months with their ids; the primary key becomes (id, at) (a
-- partitioned table's unique keys must include its partition key); every index, CHECK
-- constraint and the append-only triggers are recreated. Row triggers of a partitioned
-- table are cloned onto each partition; statement triggers are not, so each partition
-- gets its own TRUNCATE trigger (gw_journal_protect).
--
-- `gateway archive` closes the months before a cut (a month start): gw_checkpoint sums
-- each account's journal before the cut into checkpoint_balances and journals those sums
-- as one 'checkpoint' row per account, at the cut. From then on the audit reads the
-- journal from the cut on, where the checkpoint rows carry the archived past: the old
-- partitions may then be exported to files and detached (gw_detach_journal_partition)
-- without any invariant changing. archive_files records what went where.
--
-- The functions are defined here, not in a file every migrate re-applies: changing one
-- takes a new migration. Each takes its clock as p_now, like the rest of the ledger.

-- -- checkpoints --------------------------------------------------------------------------

-- One per cut, never changed. last_journal_id: the newest journal row when the checkpoint
-- was taken; a row before the cut with a larger id was written into the closed period
-- afterwards (the audit names it).
CREATE TABLE checkpoints (
    id              bigserial PRIMARY KEY,
    cut             timestamptz NOT NULL UNIQUE,
    at              timestamptz NOT NULL,
    actor           text        NOT NULL,
    previous_cut    timestamptz,
    last_journal_id bigint      NOT NULL,
    CHECK (previous_cut IS NULL OR previous_cut < cut)
);

-- Each account's journal sums before the cut (accounts whose three sums are zero carry
-- nothing and have no row). The same figures are journaled as 'checkpoint' rows.
CREATE TABLE checkpoint_balances (
    checkpoint_id bigint NOT NULL REFERENCES checkpoints (id),
    org_id        text   NOT NULL,
    token_type    text   NOT NULL,
    allowance     bigint NOT NULL,
    purchased     bigint NOT NULL,
    reserved      bigint NOT NULL,
    PRIMARY KEY (checkpoint_id, org_id, token_type)
);

CREATE FUNCTION checkpoint_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'checkpoints are append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION checkpoint_refuse_change();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION checkpoint_refuse_change();
CREATE TRIGGER checkpoint_balances_append_only BEFORE UPDATE OR DELETE ON checkpoint_balances
    FOR EACH ROW EXECUTE FUNCTION checkpoint_refuse_change();
CREATE TRIGGER checkpoint_balances_no_truncate BEFORE TRUNCATE ON checkpoint_balances
    FOR EACH STATEMENT EXECUTE FUNCTION checkpoint_refuse_change();

-- What each archive run wrote and detached, by checkpoint: the checkpoint's balances and
-- the journal partitions before its cut (recorded with the checkpoint, rows counted then;
-- file and sha256 once exported; for a partition, detached_at once detached and kept_as
-- the detached table until dropped), and the settled reservations pruned into files.
-- month: the partition's, or the checkpoint's cut.
CREATE TABLE archive_files (
    id            bigserial PRIMARY KEY,
    checkpoint_id bigint      NOT NULL REFERENCES checkpoints (id),
    kind          text        NOT NULL CHECK (kind IN ('journal', 'checkpoint', 'reservations')),
    partition     text UNIQUE,
    month         timestamptz,
    rows          bigint      NOT NULL CHECK (rows >= 0),
    file          text,
    sha256        text,
    written_at    timestamptz,
    detached_at   timestamptz,
    kept_as       text,
    dropped_at    timestamptz,
    CHECK ((kind = 'journal') = (partition IS NOT NULL)),
    CHECK ((kind = 'reservations') = (month IS NULL)),
    CHECK (kind <> 'reservations' OR file IS NOT NULL)
);

-- -- the partitioned journal ---------------------------------------------------------------

ALTER TABLE journal RENAME TO journal_unpartitioned;

-- Same columns in the same order (exports and INSERT ... SELECT * rely on it).
CREATE TABLE journal (
    id              bigint      NOT NULL DEFAULT nextval('journal_id_seq'),
    at              timestamptz NOT NULL,
    org_id          text        NOT NULL,
    token_type      text        NOT NULL,
    kind            text        NOT NULL,
    allowance_delta bigint      NOT NULL DEFAULT 0,
    purchased_delta bigint      NOT NULL DEFAULT 0,
    reserved_delta  bigint      NOT NULL DEFAULT 0,
    reservation_id  uuid,
    route           text,
    user_id         text,
    actor           text,
    reason          text,
    request_id      text,
    shadow_amount   bigint,
    unbilled        bigint      NOT NULL DEFAULT 0,
    -- 'checkpoint' carries an account's sums from before a cut into the journal after it.
    CONSTRAINT journal_kind_check CHECK (kind IN (
        'grant', 'refresh', 'lapse', 'purchase', 'reserve', 'commit', 'refund', 'expire',
        'adjust', 'shadow', 'reversal', 'checkpoint')),
    CONSTRAINT journal_shadow_moves_nothing CHECK (
        kind <> 'shadow'
        OR (allowance_delta = 0 AND purchased_delta = 0 AND reserved_delta = 0)),
    CONSTRAINT journal_unbilled_check CHECK (unbilled >= 0),
    CONSTRAINT journal_unbilled_on_commit CHECK (unbilled = 0 OR kind = 'commit'),
    CONSTRAINT journal_checkpoint_names_no_reservation CHECK (
        kind <> 'checkpoint' OR reservation_id IS NULL)
) PARTITION BY RANGE (at);
ALTER SEQUENCE journal_id_seq OWNED BY journal.id;

-- The first instant of the UTC month p_add months after p_at's, whatever the session's
-- time zone (calendar arithmetic on timestamptz follows the session's zone).
CREATE FUNCTION gw_month(p_at timestamptz, p_add int) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT (date_trunc('month', p_at AT TIME ZONE 'UTC') + make_interval(months => p_add))
        AT TIME ZONE 'UTC'
$$;

-- The journal's attached partitions and their bounds (NULL for the default partition).
CREATE FUNCTION gw_journal_partitions()
RETURNS TABLE (name text, lower_bound timestamptz, upper_bound timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text, b.m[1]::timestamptz, b.m[2]::timestamptz
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    LEFT JOIN LATERAL (
        SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                            $re$FROM \('([^']+)'\) TO \('([^']+)'\)$re$) AS m
    ) b ON true
    WHERE i.inhparent = 'journal'::regclass
    ORDER BY 2 NULLS LAST
$$;

-- Make a journal table refuse TRUNCATE (a partition's own statement trigger: the
-- partitioned table's does not fire when the partition is truncated by name) and, with
-- p_rows, UPDATE and DELETE (a detached partition loses the row trigger it had cloned).
CREATE FUNCTION gw_journal_protect(p_table text, p_rows boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE OR REPLACE TRIGGER journal_no_truncate BEFORE TRUNCATE ON %I'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change()', p_table);
    IF p_rows THEN
        EXECUTE format('CREATE OR REPLACE TRIGGER journal_append_only'
                       ' BEFORE UPDATE OR DELETE ON %I'
                       ' FOR EACH ROW EXECUTE FUNCTION journal_refuse_change()', p_table);
    END IF;
END
$$;

-- The partition journal_YYYY_MM of the UTC month starting at p_month.
CREATE FUNCTION gw_create_journal_partition(p_month timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_name text := 'journal_' || to_char(p_month AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF journal FOR VALUES FROM (%L) TO (%L)',
                   v_name, p_month, gw_month(p_month, 1));
    PERFORM gw_journal_protect(v_name, false);
END
$$;

-- Create the monthly partitions from p_now's month to p_months_ahead months after it, and
-- those of the months whose rows the default partition caught (a clock outside the
-- partitions made so far), moving those rows in with their ids. Months before the latest
-- checkpoint's cut are archived and never made again: a row for them stays in the
-- default partition, where the audit names it. Cheap when there is nothing to do (reads
-- the catalog and the normally empty default partition); safe to call concurrently.
-- Returns how many partitions were created; fails with lock_not_available (55P03) when
-- the journal stayed busy for 2 seconds.
CREATE FUNCTION gw_ensure_journal_partitions(p_now timestamptz, p_months_ahead int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    v_horizon timestamptz := gw_month(p_now, p_months_ahead + 1);
    v_cut timestamptz;
    v_missing timestamptz[];
    v_strays boolean;
    v_lock_timeout text;
BEGIN
    FOR v_attempt IN 1..2 LOOP
        SELECT coalesce(max(c.cut), '-infinity') INTO v_cut FROM checkpoints c;
        SELECT array_agg(m ORDER BY m) INTO v_missing FROM (
            SELECT gw_month(p_now, k) AS m FROM generate_series(0, p_months_ahead) k
            UNION
            SELECT DISTINCT gw_month(d.at, 0) FROM journal_default d
            WHERE d.at < v_horizon AND d.at >= v_cut
        ) wanted
        WHERE m >= v_cut
          AND NOT EXISTS (SELECT 1 FROM gw_journal_partitions() p WHERE p.lower_bound = m);
        IF v_missing IS NULL THEN
            RETURN 0;
        END IF;
        EXIT WHEN v_attempt = 2;
        -- Another caller may be at it: queue, then look again.
        PERFORM pg_advisory_xact_lock(
            hashtext('metering-gateway:journal-partitions:' || current_schema()));
    END LOOP;

    -- Creating a partition locks the whole journal, and every writer queues behind the
    -- lock while it waits: give up (SQLSTATE 55P03) rather than stall them; the default
    -- partition takes the rows meanwhile and the next call tries again.
    v_lock_timeout := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '2s', true);
    -- A partition cannot be created over rows the default partition holds: set those rows
    -- aside (a table's rows outlive its detachment and its triggers; DROP is no DELETE),
    -- create the partitions on a new, empty default, then route the rows back in.
    SELECT EXISTS (SELECT 1 FROM journal_default d
                   WHERE gw_month(d.at, 0) = ANY (v_missing)) INTO v_strays;
    IF v_strays THEN
        ALTER TABLE journal DETACH PARTITION journal_default;
        ALTER TABLE journal_default RENAME TO journal_default_moving;
        CREATE TABLE journal_default PARTITION OF journal DEFAULT;
        PERFORM gw_journal_protect('journal_default', false);
    END IF;
    PERFORM gw_create_journal_partition(m) FROM unnest(v_missing) m;
    IF v_strays THEN
        INSERT INTO journal SELECT * FROM journal_default_moving;
        DROP TABLE journal_default_moving;
    END IF;
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
    RETURN cardinality(v_missing);
END
$$;

CREATE TABLE journal_default PARTITION OF journal DEFAULT;
SELECT gw_journal_protect('journal_default', false);

-- The months of the existing rows, and the next three, get their partitions first (the
-- rows are then routed straight to them); the catch-all default stays empty.
SELECT gw_create_journal_partition(m) FROM (
    SELECT DISTINCT gw_month(j.at, 0) AS m FROM journal_unpartitioned j
    UNION
    SELECT gw_month(now(), k) FROM generate_series(0, 3) k
) months ORDER BY m;

INSERT INTO journal SELECT * FROM journal_unpartitioned;
-- Its append-only triggers go with it: DROP is not DELETE.
DROP TABLE journal_unpartitioned;

-- Built once per partition, after the rows are in.
ALTER TABLE journal ADD CONSTRAINT journal_pkey PRIMARY KEY (id, at);
CREATE INDEX journal_by_account ON journal (org_id, token_type, id);
CREATE INDEX journal_by_reservation ON journal (reservation_id) WHERE reservation_id IS NOT NULL;
CREATE INDEX journal_commits_by_org_time ON journal (org_id, at) WHERE kind = 'commit';

CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();

-- -- archiving ------------------------------------------------------------------------------

-- Close the journal before p_cut (a UTC month start, not after p_now's month): each
-- account's sums of the rows from the previous cut (or the beginning) to p_cut become a
-- checkpoint, journaled as one 'checkpoint' row per account at p_cut; the balances and
-- every attached partition before p_cut are recorded in archive_files with their row
-- counts, to be exported (and the partitions detached). Writers into the closed months (none, unless a clock is wrong) are waited
-- for, and wait for this, through SHARE locks on their partitions.
-- status: ok | invalid_cut | already_archived (a checkpoint at or after p_cut exists)
--       | held_reservation (detail: the oldest reservation still held from before p_cut)
--       | unpartitioned_rows (detail: rows before p_cut in the default partition)
CREATE FUNCTION gw_checkpoint(p_cut timestamptz, p_now timestamptz, p_actor text)
RETURNS TABLE (status text, checkpoint_id bigint, accounts bigint, detail text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev checkpoints;
    v_held reservations;
    v_part record;
    v_rows bigint;
    v_stray bigint;
    v_id bigint;
    v_accounts bigint;
BEGIN
    IF p_cut IS DISTINCT FROM gw_month(p_cut, 0) OR p_cut > gw_month(p_now, 0) THEN
        RETURN QUERY SELECT 'invalid_cut', NULL::bigint, 0::bigint,
            format('the cut must be a month start no later than this month''s, %s',
                   to_char(gw_month(p_now, 0) AT TIME ZONE 'UTC', 'YYYY-MM'));
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('metering-gateway:archive:' || current_schema()));
    SELECT * INTO v_prev FROM checkpoints c ORDER BY c.cut DESC LIMIT 1;
    IF FOUND AND v_prev.cut >= p_cut THEN
        RETURN QUERY SELECT 'already_archived', v_prev.id,
            (SELECT count(*) FROM checkpoint_balances b WHERE b.checkpoint_id = v_prev.id),
            format('checkpoint %s cut the journal at %s', v_prev.id,
                   to_char(v_prev.cut AT TIME ZONE 'UTC', 'YYYY-MM'));
        RETURN;
    END IF;
    FOR v_part IN
        SELECT p.name FROM gw_journal_partitions() p
        WHERE p.upper_bound IS NULL OR p.upper_bound <= p_cut ORDER BY p.lower_bound
    LOOP
        EXECUTE format('LOCK TABLE %I IN SHARE MODE', v_part.name);
    END LOOP;

    SELECT * INTO v_held FROM reservations r
        WHERE r.state = 'held' AND r.created_at < p_cut ORDER BY r.created_at LIMIT 1;
    IF FOUND THEN
        RETURN QUERY SELECT 'held_reservation', NULL::bigint, 0::bigint,
            format('reservation %s (%s/%s, %s tokens) has been held since %s', v_held.id,
                   v_held.org_id, v_held.token_type, v_held.amount,
                   to_char(v_held.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'));
        RETURN;
    END IF;
    SELECT count(*) INTO v_stray FROM journal_default d
        WHERE d.at < p_cut AND d.at >= coalesce(v_prev.cut, '-infinity');
    IF v_stray > 0 THEN
        RETURN QUERY SELECT 'unpartitioned_rows', NULL::bigint, 0::bigint,
            format('%s journal row(s) before the cut are in the default partition', v_stray);
        RETURN;
    END IF;

    INSERT INTO checkpoints (cut, at, actor, previous_cut, last_journal_id)
        VALUES (p_cut, p_now, p_actor, v_prev.cut,
                coalesce((SELECT max(j.id) FROM journal j), 0))
        RETURNING id INTO v_id;
    INSERT INTO checkpoint_balances (checkpoint_id, org_id, token_type, allowance, purchased,
            reserved)
        SELECT v_id, j.org_id, j.token_type, sum(j.allowance_delta), sum(j.purchased_delta),
               sum(j.reserved_delta)
        FROM journal j
        WHERE j.at >= coalesce(v_prev.cut, '-infinity') AND j.at < p_cut
        GROUP BY j.org_id, j.token_type
        HAVING sum(j.allowance_delta) <> 0 OR sum(j.purchased_delta) <> 0
            OR sum(j.reserved_delta) <> 0;
    GET DIAGNOSTICS v_accounts = ROW_COUNT;
    INSERT INTO archive_files (checkpoint_id, kind, month, rows)
        VALUES (v_id, 'checkpoint', p_cut, v_accounts);
    INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta,
            reserved_delta, actor, reason)
        SELECT p_cut, b.org_id, b.token_type, 'checkpoint', b.allowance, b.purchased,
               b.reserved, p_actor,
               format('checkpoint %s: the journal before %s, carried over', v_id,
                      to_char(p_cut AT TIME ZONE 'UTC', 'YYYY-MM'))
        FROM checkpoint_balances b WHERE b.checkpoint_id = v_id
        ORDER BY b.org_id, b.token_type;

    FOR v_part IN
        SELECT p.name, p.lower_bound FROM gw_journal_partitions() p
        WHERE p.upper_bound <= p_cut
          AND NOT EXISTS (SELECT 1 FROM archive_files f WHERE f.partition = p.name)
        ORDER BY p.lower_bound
    LOOP
        EXECUTE format('SELECT count(*) FROM %I', v_part.name) INTO v_rows;
        INSERT INTO archive_files (checkpoint_id, kind, partition, month, rows)
            VALUES (v_id, 'journal', v_part.name, v_part.lower_bound, v_rows);
    END LOOP;
    RETURN QUERY SELECT 'ok', v_id, v_accounts, NULL::text;
END
$$;

-- Detach an exported partition of the closed period, checking under its lock that it
-- still holds the rows counted at the checkpoint (and exported). p_keep: rename it
-- journal_archived_YYYY_MM, append-only like the journal; else drop it.
-- status: ok | not_found (not an attached partition recorded by a checkpoint)
--       | not_exported | rows_changed
CREATE FUNCTION gw_detach_journal_partition(p_partition text, p_keep boolean, p_now timestamptz)
RETURNS TABLE (status text, kept_as text) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_file archive_files;
    v_rows bigint;
    v_kept text;
BEGIN
    SELECT * INTO v_file FROM archive_files f
        WHERE f.partition = p_partition AND f.detached_at IS NULL FOR UPDATE;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM gw_journal_partitions() p
                                WHERE p.name = p_partition) THEN
        RETURN QUERY SELECT 'not_found', NULL::text;
        RETURN;
    END IF;
    IF v_file.sha256 IS NULL THEN
        RETURN QUERY SELECT 'not_exported', NULL::text;
        RETURN;
    END IF;
    EXECUTE format('LOCK TABLE %I IN SHARE MODE', p_partition);
    EXECUTE format('SELECT count(*) FROM %I', p_partition) INTO v_rows;
    IF v_rows <> v_file.rows THEN
        RETURN QUERY SELECT 'rows_changed', NULL::text;
        RETURN;
    END IF;
    EXECUTE format('ALTER TABLE journal DETACH PARTITION %I', p_partition);
    IF p_keep THEN
        v_kept := 'journal_archived_' || substr(p_partition, length('journal_') + 1);
        EXECUTE format('ALTER TABLE %I RENAME TO %I', p_partition, v_kept);
        PERFORM gw_journal_protect(v_kept, true);
    ELSE
        EXECUTE format('DROP TABLE %I', p_partition);
    END IF;
    UPDATE archive_files SET detached_at = p_now, kept_as = v_kept,
            dropped_at = CASE WHEN p_keep THEN NULL ELSE p_now END
        WHERE id = v_file.id;
    RETURN QUERY SELECT 'ok', v_kept;
END
$$;

-- Drop a detached partition kept by gw_detach_journal_partition (the caller has checked
-- its exported file). Returns false when there is no such kept table.
CREATE FUNCTION gw_drop_archived_partition(p_partition text, p_now timestamptz)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_file archive_files;
BEGIN
    SELECT * INTO v_file FROM archive_files f
        WHERE f.partition = p_partition AND f.kept_as IS NOT NULL FOR UPDATE;
    IF NOT FOUND OR to_regclass(quote_ident(v_file.kept_as)) IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE %I', v_file.kept_as);
    UPDATE archive_files SET kept_as = NULL, dropped_at = p_now WHERE id = v_file.id;
    RETURN true;
END
$$;

-- Settled reservations whose journal rows are all before the latest checkpoint's cut
-- (reserve, settlement, lapses and any reversal) and that were made more than p_keep_days
-- ago: with p_delete, deleted (and returned, for the caller to keep). Their idempotency
-- keys go with them: a key is honoured for at least p_keep_days.
CREATE FUNCTION gw_prune_reservations(p_now timestamptz, p_keep_days int, p_delete boolean)
RETURNS SETOF reservations LANGUAGE sql AS $$
    WITH cut AS (
        SELECT max(c.cut) AS at FROM checkpoints c
    ), candidates AS (
        SELECT r.id FROM reservations r, cut
        WHERE r.state <> 'held' AND r.settled_at < cut.at
          AND coalesce(r.charge_refunded_at, '-infinity') < cut.at
          AND r.created_at < p_now - make_interval(days => p_keep_days)
    ), gone AS (
        DELETE FROM reservations r USING candidates c
        WHERE p_delete AND r.id = c.id
        RETURNING r.*
    )
    SELECT * FROM gone
    UNION ALL
    SELECT r.* FROM reservations r JOIN candidates c ON c.id = r.id WHERE NOT p_delete
    ORDER BY created_at, id
$$;

-- What `gateway archive` writes beside a checkpoint's files (manifest_YYYY_MM.json): the
-- checkpoint, the journal's columns, and each file with its rows and sha256.
CREATE FUNCTION gw_archive_manifest(p_checkpoint_id bigint) RETURNS json
LANGUAGE sql STABLE AS $$
    WITH files AS (
        SELECT f.*, regexp_replace(f.file, '^.*/', '') AS name
        FROM archive_files f WHERE f.checkpoint_id = p_checkpoint_id
    )
    SELECT json_build_object(
        'checkpoint', json_build_object(
            'id', c.id, 'cut', c.cut, 'taken_at', c.at, 'actor', c.actor,
            'previous_cut', c.previous_cut, 'last_journal_id', c.last_journal_id,
            'accounts', t.accounts,
            'totals', json_build_object('allowance', t.allowance, 'purchased', t.purchased,
                                        'reserved', t.reserved),
            'balances', (SELECT json_build_object('file', f.name, 'rows', f.rows,
                                                  'sha256', f.sha256,
                                                  'written_at', f.written_at)
                         FROM files f WHERE f.kind = 'checkpoint')),
        'journal_columns', (SELECT json_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
                            WHERE a.attrelid = 'journal'::regclass AND a.attnum > 0
                              AND NOT a.attisdropped),
        'journal', (SELECT coalesce(json_agg(json_build_object(
                               'partition', f.partition,
                               'month', to_char(f.month AT TIME ZONE 'UTC', 'YYYY-MM'),
                               'file', f.name, 'rows', f.rows, 'sha256', f.sha256,
                               'written_at', f.written_at, 'detached_at', f.detached_at,
                               'kept_as', f.kept_as) ORDER BY f.month), '[]')
                    FROM files f WHERE f.kind = 'journal'),
        'reservations_pruned', (SELECT coalesce(json_agg(json_build_object(
                                           'file', f.name, 'rows', f.rows, 'sha256', f.sha256,
                                           'written_at', f.written_at) ORDER BY f.id), '[]')
                                FROM files f WHERE f.kind = 'reservations'))
    FROM checkpoints c,
         LATERAL (SELECT count(*) AS accounts, coalesce(sum(b.allowance), 0) AS allowance,
                         coalesce(sum(b.purchased), 0) AS purchased,
                         coalesce(sum(b.reserved), 0) AS reserved
                  FROM checkpoint_balances b WHERE b.checkpoint_id = c.id) t
    WHERE c.id = p_checkpoint_id
$$;

-- `gateway archive --dry-run`: what gw_checkpoint would answer at p_cut (status, detail,
-- accounts), then the partitions a run would archive ([{partition, rows}]) and how many
-- reservations it would prune, all rolled back (a subtransaction ended by an error).
CREATE FUNCTION gw_archive_dry_run(p_cut timestamptz, p_now timestamptz, p_keep_days int)
RETURNS TABLE (status text, detail text, accounts bigint, partitions json, prunable bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_checkpoint record;
BEGIN
    BEGIN
        SELECT * INTO v_checkpoint FROM gw_checkpoint(p_cut, p_now, 'dry run');
        status := v_checkpoint.status;
        detail := v_checkpoint.detail;
        accounts := v_checkpoint.accounts;
        IF status IN ('ok', 'already_archived') THEN
            SELECT coalesce(json_agg(json_build_object('partition', f.partition, 'rows', f.rows)
                                     ORDER BY f.month), '[]')
                INTO partitions
                FROM archive_files f
                WHERE f.kind = 'journal' AND f.detached_at IS NULL AND f.month < p_cut;
            SELECT count(*) INTO prunable FROM gw_prune_reservations(p_now, p_keep_days, false);
        END IF;
        RAISE EXCEPTION 'dry run' USING ERRCODE = 'GWDRY';
    EXCEPTION WHEN SQLSTATE 'GWDRY' THEN
        NULL;  -- everything above is undone; the answers stay in the variables
    END;
    RETURN NEXT;
END
$$;

"""The bounded journal: monthly partitions made ahead, checkpoints, exports and detached
partitions, pruned reservations, and the audit of a checkpoint plus the live journal. The
``ledger`` fixture audits every invariant after each test."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.errors import LedgerError
from gateway.ledger import FUNCTION_FILES, Account, Ledger
from gateway.ledger.archive import JournalArchive
from gateway.rules import Rules
from tests.conftest import Clock, process_env, rules_yaml
from tests.upstream import Upstream

REPO = Path(__file__).parent.parent
TTL = 60.0


def month_start(at: datetime, add: int = 0) -> datetime:
    year, month = divmod(at.year * 12 + at.month - 1 + add, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def partition(month: datetime) -> str:
    return f"journal_{month:%Y_%m}"


def travel(clock: Clock, when: datetime) -> None:
    clock.offset = when - datetime.now(UTC)


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def connect(database_url: str, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        database_url, server_settings={"search_path": schema, "timezone": "UTC"}
    )


async def partitions(database_url: str, schema: str) -> list[tuple[str, Any, Any]]:
    """The journal's attached partitions, oldest first: (name, from, to); default last."""
    conn = await connect(database_url, schema)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT * FROM gw_journal_partitions()")]
    finally:
        await conn.close()


async def every_balance(ledger: Ledger, orgs: list[str]) -> dict[str, list[Account]]:
    return {org: await ledger.balances(org) for org in orgs}


async def spend(ledger: Ledger, org: str, token_type: str, amount: int, charged: int) -> uuid.UUID:
    held = await ledger.reserve(org, token_type, amount, ttl_seconds=TTL)
    assert held.reservation_id is not None, held
    await ledger.commit(held.reservation_id, charged=charged)
    return held.reservation_id


async def test_archiving_the_oldest_month_keeps_every_invariant(
    ledger: Ledger, clock: Clock, tmp_path: Path, database_url: str, schema: str
) -> None:
    now = datetime.now(UTC)
    first, second, third = (month_start(now, k) for k in (-3, -2, -1))

    travel(clock, first + timedelta(days=2))
    await ledger.create_org("acme", "pro")
    await ledger.create_org("bigco", "enterprise")
    await ledger.grant("acme", "general", 40, reason="pack")
    pruned = await spend(ledger, "acme", "general", 5, charged=3)
    refunded = await ledger.reserve("acme", "forecast", 4, ttl_seconds=TTL)
    assert refunded.reservation_id is not None
    await ledger.refund(refunded.reservation_id, reason="upstream failed")
    given_back = await spend(ledger, "bigco", "general", 7, charged=7)
    # Held across the cut: made in the first month, settled in the second.
    across = await ledger.reserve("bigco", "lead_generation", 10, ttl_seconds=40 * 86400)
    assert across.reservation_id is not None

    travel(clock, second + timedelta(days=3))
    await ledger.commit(across.reservation_id, charged=6)
    await spend(ledger, "acme", "general", 2, charged=2)

    travel(clock, third + timedelta(days=4))
    await ledger.refund_charge(given_back, actor="test", reason="goodwill")
    await spend(ledger, "bigco", "forecast", 3, charged=1)
    lost = await ledger.reserve("acme", "general", 1, ttl_seconds=1)
    clock.advance(seconds=2)
    assert await ledger.expire_overdue() == 1

    travel(clock, now)
    orgs = ["acme", "bigco"]
    before = await every_balance(ledger, orgs)
    conn = await connect(database_url, schema)
    try:
        expected_rows = await conn.fetchval(
            "SELECT count(*) FROM journal WHERE at >= $1 AND at < $2", first, second
        )
        expected_sums = {
            (r["org_id"], r["token_type"]): (r["a"], r["p"], r["r"])
            for r in await conn.fetch(
                "SELECT org_id, token_type, sum(allowance_delta) AS a,"
                " sum(purchased_delta) AS p, sum(reserved_delta) AS r FROM journal"
                " WHERE at < $1 GROUP BY 1, 2",
                second,
            )
        }
    finally:
        await conn.close()

    archive = JournalArchive.of(ledger)
    report = await archive.archive(second, tmp_path, actor="test")

    # The checkpoint: each account's sums before the cut, journaled at the cut.
    assert report.new_checkpoint and report.checkpoint_id is not None
    assert report.accounts == len(expected_sums)
    # The first month: exported, counted, checksummed, detached and kept.
    assert [(a.partition, a.rows, a.kept_as) for a in report.archived] == [
        (partition(first), expected_rows, f"journal_archived_{first:%Y_%m}")
    ]
    exported = report.archived[0]
    assert exported.file == tmp_path / f"{partition(first)}.csv"
    assert sha256(exported.file) == exported.sha256
    rows = read_csv(exported.file)
    assert rows[0][:3] == ["id", "at", "org_id"] and len(rows) == 1 + expected_rows
    ids = [int(row[0]) for row in rows[1:]]
    assert ids == sorted(ids)
    assert all(row[1].startswith(f"{first:%Y-%m}") for row in rows[1:])

    manifest = json.loads((tmp_path / f"manifest_{second:%Y_%m}.json").read_text())
    assert manifest["checkpoint"]["id"] == report.checkpoint_id
    assert manifest["checkpoint"]["cut"] == second.isoformat()
    assert manifest["checkpoint"]["accounts"] == len(expected_sums)
    balances_file = manifest["checkpoint"]["balances"]
    assert sha256(tmp_path / balances_file["file"]) == balances_file["sha256"]
    assert balances_file["rows"] == len(expected_sums)
    assert [(j["partition"], j["file"], j["rows"], j["sha256"]) for j in manifest["journal"]] == [
        (partition(first), exported.file.name, expected_rows, exported.sha256)
    ]
    assert manifest["journal_columns"] == rows[0]

    names = [name for name, _, _ in await partitions(database_url, schema)]
    assert partition(first) not in names
    assert {partition(second), partition(third), partition(now)} <= set(names)

    conn = await connect(database_url, schema)
    try:
        carried = {
            (r["org_id"], r["token_type"]): (
                r["allowance_delta"],
                r["purchased_delta"],
                r["reserved_delta"],
            )
            for r in await conn.fetch("SELECT * FROM journal WHERE kind = 'checkpoint'")
        }
        assert carried == expected_sums
        assert await conn.fetchval("SELECT count(*) FROM journal WHERE at < $1", second) == 0
        kept = f"journal_archived_{first:%Y_%m}"
        assert await conn.fetchval(f"SELECT count(*) FROM {kept}") == expected_rows
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await conn.execute(f"DELETE FROM {kept}")
    finally:
        await conn.close()

    assert await ledger.audit() == []
    assert await every_balance(ledger, orgs) == before
    # Settled in the first month and older than 30 days: pruned into a file. Those with
    # a journal row after the cut (settled after it, or their charge given back) stay.
    assert await ledger.reservation(pruned) is None
    assert await ledger.reservation(refunded.reservation_id) is None
    assert await ledger.reservation(across.reservation_id) is not None
    assert await ledger.reservation(given_back) is not None
    assert await ledger.reservation(lost.reservation_id) is not None  # type: ignore[arg-type]
    assert report.pruned == 2 and report.pruned_file is not None
    pruned_rows = read_csv(report.pruned_file)
    assert {row[0] for row in pruned_rows[1:]} == {str(pruned), str(refunded.reservation_id)}
    assert manifest["reservations_pruned"] == [
        {
            "file": report.pruned_file.name,
            "rows": 2,
            "sha256": sha256(report.pruned_file),
            "written_at": manifest["reservations_pruned"][0]["written_at"],
        }
    ]

    # Life goes on, and stays auditable.
    await spend(ledger, "acme", "general", 4, charged=4)
    assert await ledger.audit() == []

    # Again: already archived, nothing changes. With --drop: the kept partition goes.
    again = await archive.archive(second, tmp_path, actor="test")
    assert not again.new_checkpoint and again.archived == [] and again.pruned == 0
    assert again.checkpoint_id == report.checkpoint_id
    dropped = await archive.archive(second, tmp_path, actor="test", drop=True)
    assert dropped.dropped == [f"journal_archived_{first:%Y_%m}"]
    conn = await connect(database_url, schema)
    try:
        assert await conn.fetchval("SELECT to_regclass($1)", dropped.dropped[0]) is None
    finally:
        await conn.close()
    assert await ledger.audit() == []


async def test_archiving_twice_carries_the_first_checkpoint_into_the_second(
    ledger: Ledger, clock: Clock, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    first, second, third = (month_start(now, k) for k in (-3, -2, -1))
    travel(clock, first + timedelta(days=1))
    await ledger.create_org("acme", "pro")
    await ledger.grant("acme", "general", 10)
    await spend(ledger, "acme", "general", 3, charged=3)
    travel(clock, second + timedelta(days=1))
    await spend(ledger, "acme", "general", 2, charged=1)
    travel(clock, third + timedelta(days=1))
    await spend(ledger, "acme", "forecast", 2, charged=2)
    travel(clock, now)
    before = await ledger.balances("acme")

    archive = JournalArchive.of(ledger)
    one = await archive.archive(second, tmp_path, drop=True)
    assert [a.partition for a in one.archived] == [partition(first)]
    assert one.archived[0].kept_as is None
    assert await ledger.audit() == []
    two = await archive.archive(third, tmp_path, drop=True)
    # The second month holds the first checkpoint's rows: they are archived with it.
    assert [a.partition for a in two.archived] == [partition(second)]
    assert two.checkpoint_id == (one.checkpoint_id or 0) + 1
    assert await ledger.audit() == []
    assert await ledger.balances("acme") == before
    assert (tmp_path / f"manifest_{second:%Y_%m}.json").exists()
    assert (tmp_path / f"manifest_{third:%Y_%m}.json").exists()


@pytest.mark.corrupts_ledger
async def test_the_audit_names_a_corrupted_checkpoint(
    ledger: Ledger, clock: Clock, tmp_path: Path, database_url: str, schema: str
) -> None:
    now = datetime.now(UTC)
    travel(clock, month_start(now, -1) + timedelta(days=1))
    await ledger.create_org("acme", "pro")
    await spend(ledger, "acme", "general", 5, charged=5)
    travel(clock, now)
    report = await JournalArchive.of(ledger).archive(month_start(now), tmp_path)
    assert await ledger.audit() == []
    conn = await connect(database_url, schema)
    try:
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await conn.execute("UPDATE checkpoint_balances SET allowance = allowance + 5")
        # As the table's owner could: behind the triggers' back.
        await conn.execute(
            "ALTER TABLE checkpoint_balances DISABLE TRIGGER checkpoint_balances_append_only"
        )
        await conn.execute(
            "UPDATE checkpoint_balances SET allowance = allowance + 5, reserved = 2"
            " WHERE org_id = 'acme' AND token_type = 'general'"
        )
    finally:
        await conn.close()
    found = {(v.invariant, v.detail.split(":")[0]) for v in await ledger.audit()}
    where = f"checkpoint {report.checkpoint_id} (cut {month_start(now):%Y-%m-%d}), account"
    assert found == {
        ("checkpoint_mismatch", f"{where} acme/general"),
        ("checkpoint_reserved_mismatch", f"{where} acme/general"),
    }


async def test_archiving_refuses_to_cut_past_a_held_reservation(
    ledger: Ledger, clock: Clock, tmp_path: Path, database_url: str, schema: str
) -> None:
    now = datetime.now(UTC)
    travel(clock, month_start(now, -2) + timedelta(days=5))
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 4, ttl_seconds=TTL)
    assert held.reservation_id is not None
    travel(clock, now)
    archive = JournalArchive.of(ledger)
    with pytest.raises(LedgerError) as exc:
        await archive.archive(month_start(now), tmp_path)
    assert exc.value.reason == "held_reservation"
    assert f"cannot archive before {now:%Y-%m}: reservation {held.reservation_id}" in str(exc.value)
    assert "acme/general, 4 tokens) has been held since" in str(exc.value)
    assert "gateway sweep" in str(exc.value)
    dry = await archive.archive(month_start(now, -2), tmp_path, dry_run=True)
    assert dry.dry_run and dry.pending == []  # a cut before the hold is fine
    conn = await connect(database_url, schema)
    try:
        assert await conn.fetchval("SELECT count(*) FROM checkpoints") == 0
    finally:
        await conn.close()
    assert not any(name.endswith(".csv") for name in os.listdir(tmp_path))

    assert await ledger.expire_overdue() == 1
    report = await archive.archive(month_start(now), tmp_path)
    assert [a.partition for a in report.archived] == [partition(month_start(now, -2))]


async def test_archiving_refuses_a_cut_after_this_month(ledger: Ledger, tmp_path: Path) -> None:
    next_month = month_start(datetime.now(UTC), 1)
    with pytest.raises(LedgerError) as exc:
        await JournalArchive.of(ledger).archive(next_month, tmp_path)
    assert exc.value.reason == "invalid_cut"
    assert f"cannot archive before {next_month:%Y-%m}: the cut must be" in str(exc.value)


async def test_partitions_are_made_ahead_and_the_default_catches_the_rest(
    ledger: Ledger, clock: Clock, database_url: str, schema: str
) -> None:
    now = datetime.now(UTC)
    archive = JournalArchive.of(ledger)
    made = await partitions(database_url, schema)
    assert [name for name, _, _ in made] == [
        *(partition(month_start(now, k)) for k in range(4)),
        "journal_default",
    ]
    assert made[0][1:] == (month_start(now), month_start(now, 1))
    assert await archive.ensure_partitions() == 0

    far = now + timedelta(days=5 * 366)
    travel(clock, far)
    await ledger.create_org("acme", "pro")
    conn = await connect(database_url, schema)
    try:
        where = await conn.fetch("SELECT id, tableoid::regclass::text AS t FROM journal")
        assert where and {r["t"] for r in where} == {"journal_default"}
        assert await archive.ensure_partitions() == 4
        moved = await conn.fetch("SELECT id, tableoid::regclass::text AS t FROM journal")
        assert {r["id"] for r in moved} == {r["id"] for r in where}
        assert {r["t"] for r in moved} == {partition(month_start(far))}
        assert await conn.fetchval("SELECT count(*) FROM journal_default") == 0
        for statement in (
            f"TRUNCATE {partition(month_start(far))}",
            f"TRUNCATE {partition(month_start(now))}",
            "TRUNCATE journal_default",
            f"DELETE FROM {partition(month_start(far))}",
            f"UPDATE {partition(month_start(far))} SET reason = 'edited'",
        ):
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(statement)
    finally:
        await conn.close()
    await spend(ledger, "acme", "general", 3, charged=2)


async def test_migrating_a_populated_ledger_keeps_its_rows_and_ids(
    database_url: str, schema: str, clock: Clock, rules: Rules, tmp_path: Path
) -> None:
    # A ledger as it was before migration 012: migrations 001-011 and the functions.
    conn = await connect(database_url, schema)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        migrations = resources.files("gateway.ledger").joinpath("sql", "migrations")
        for file in sorted(migrations.iterdir(), key=lambda f: f.name):
            if file.name.endswith(".sql") and file.name < "012":
                await conn.execute(file.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", file.name)
        # Functions of later migrations' tables are created, never called, here.
        await conn.execute("SET check_function_bodies = off")
        for name in FUNCTION_FILES:
            await conn.execute(resources.files("gateway.ledger").joinpath("sql", name).read_text())
    finally:
        await conn.close()

    ledger = await Ledger.connect(database_url, schema=schema, clock=clock)
    try:
        await ledger.sync_plans(rules.plan_allowances())
        now = datetime.now(UTC)
        months = [month_start(now, k) for k in (-3, -2, -1)]
        for k, month in enumerate(months):
            travel(clock, month + timedelta(days=k + 1))
            if k == 0:
                await ledger.create_org("acme", "pro")
                await ledger.grant("acme", "forecast", 12, kind="purchase")
            await spend(ledger, "acme", "general", 4 + k, charged=3)
            refunded = await ledger.reserve("acme", "forecast", 2, ttl_seconds=TTL)
            assert refunded.reservation_id is not None
            await ledger.refund(refunded.reservation_id, reason="upstream failed")
        travel(clock, now)
        balances = await ledger.balances("acme")  # refreshed to now: journals the lapses
        conn = await connect(database_url, schema)
        try:
            old = await conn.fetch("SELECT * FROM journal ORDER BY id")
        finally:
            await conn.close()

        assert "012_journal_partitions.sql" in await ledger.migrate()

        conn = await connect(database_url, schema)
        try:
            kind = "SELECT relkind::text FROM pg_class WHERE oid = 'journal'::regclass"
            assert await conn.fetchval(kind) == "p"  # partitioned
            assert [dict(r) for r in await conn.fetch("SELECT * FROM journal ORDER BY id")] == [
                dict(r) for r in old
            ]
            per_month = {
                r["t"]: r["n"]
                for r in await conn.fetch(
                    "SELECT tableoid::regclass::text AS t, count(*) AS n FROM journal GROUP BY 1"
                )
            }
            assert per_month == Counter(partition(month_start(r["at"])) for r in old)
            assert set(per_month) == {partition(m) for m in [*months, month_start(now)]}
            indexes = {
                r["indexname"]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'journal'"
                    " AND schemaname = $1",
                    schema,
                )
            }
            assert indexes == {
                "journal_pkey",
                "journal_by_account",
                "journal_by_reservation",
                "journal_commits_by_org_time",
            }
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(f"TRUNCATE {partition(months[0])}")
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute("DELETE FROM journal")
        finally:
            await conn.close()
        assert await ledger.audit() == []
        assert await ledger.balances("acme") == balances
        # The sequence carries on; the new row lands in this month's partition.
        await spend(ledger, "acme", "general", 1, charged=1)
        newest = await ledger.journal("acme", limit=1)
        assert newest[0]["id"] > old[-1]["id"]
        report = await JournalArchive.of(ledger).archive(months[2], tmp_path)
        assert [a.partition for a in report.archived] == [partition(m) for m in months[:2]]
        assert await ledger.audit() == []
    finally:
        await ledger.close()


async def test_the_archive_command(
    ledger: Ledger,
    clock: Clock,
    database_url: str,
    redis_url: str,
    schema: str,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    last = month_start(now, -1)
    travel(clock, last + timedelta(days=1))
    await ledger.create_org("acme", "pro")
    await spend(ledger, "acme", "general", 2, charged=2)
    travel(clock, now)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_yaml(upstream[1]))
    env = process_env(database_url, redis_url, schema, rules_file)
    out = tmp_path / "out"

    async def gateway(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "archive",
            *args,
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, stdout.decode(), stderr.decode()

    code, stdout, stderr = await gateway("--before", f"{now:%Y-%m}", "--to", str(out), "--dry-run")
    assert code == 0, stderr
    # No partition was made for last month's rows (written by a clock set back).
    assert "7 journal row(s) before the cut are in the default partition: a run first" in stdout
    assert await JournalArchive.of(ledger).ensure_partitions() == 1
    code, stdout, stderr = await gateway("--before", f"{now:%Y-%m}", "--to", str(out), "--dry-run")
    assert code == 0, stderr
    assert "would checkpoint the balances of 5 account(s)" in stdout  # pro's five types
    assert f"would archive {partition(last)}: 7 row(s)" in stdout  # 5 refresh, 1 pair
    assert not out.exists()
    code, stdout, stderr = await gateway("--before", f"{now:%Y-%m}", "--to", str(out))
    assert code == 0, stderr
    assert f"{partition(last)}: detached, kept as journal_archived_{last:%Y_%m}" in stdout
    assert (out / f"{partition(last)}.csv").exists()
    code, stdout, stderr = await gateway("--before", f"{now:%Y-%m}", "--to", str(out))
    assert code == 0, stderr
    assert f"the journal before {now:%Y-%m} is already archived" in stdout
    code, stdout, stderr = await gateway("--before", f"{month_start(now, 1):%Y-%m}")
    assert code == 1 and "gateway: cannot archive before" in stderr
    code, stdout, stderr = await gateway("--before", "March")
    assert code == 2 and "'March' is not a month like 2024-03" in stderr

"""Size: does the ledger stay flat as the journal grows? 100,000 organizations, then
10 million journal rows, then the oldest months archived.

In a schema of its own (dropped at the end unless --keep) it creates the organizations
with their accounts, and measures through ``gateway.ledger.Ledger`` (the code path of the
gateway) sequential reserve+commit pairs on random organizations and the stats query
(``gw_usage``, as ``GET /v1/tokens/stats`` asks it) for random organizations. Then it
writes a year of history, consistent with the accounts and reservations (the audit
holds): committed reservations of one token each, spread over the last twelve months, a
reserve and a commit row apiece, generated in SQL (INSERT ... SELECT generate_series), and
measures again; then archives the oldest months (``gateway archive``'s code) and measures
once more. It also times the audit at full size and the archive itself.

    .venv/bin/python bench/size.py [--orgs 100000] [--rows 10000000] [--pairs 2000]
        [--stats 500] [--rounds 2] [--archive-months 2] [--keep] [--database-url URL]

Measured on 2026-11-22 on the project's 2-core machine (PostgreSQL 15 local,
shared_buffers 128MB), 100,000 organizations, per round 2,000 sequential pairs and 500
stats queries on random organizations, two rounds per size, each size measured after
VACUUM (ANALYZE) and CHECKPOINT:

    journal rows   reserve+commit p50 / p99   gw_usage p50 / p99
         200,000      2.7 / 5.7 ms              3.30 / 6.07 ms
                      3.9 / 7.5 ms              2.63 / 4.79 ms
      10,008,800      1.5 / 2.6 ms              1.59 / 2.83 ms
                      1.7 / 3.5 ms              1.87 / 5.02 ms
       8,469,918      2.3 / 4.0 ms              2.40 / 3.34 ms  (two oldest months archived)
                      1.9 / 3.7 ms              1.71 / 2.65 ms

Writing the 9.8M history rows took 286 s; the audit 71 s at 10M rows, 50 s after
archiving; the archive of two months (1.65M rows exported, a checkpoint of 100,000
accounts, 773,841 reservations pruned) 15 s. The machine is shared: in earlier runs, with
autovacuum and other test suites running, p99 reached 22 ms at 10M rows and 57 ms right
after archiving, p50 stayed between 1.5 and 5.6 ms. gw_usage's cost follows the number
of attached partitions (17 here), not rows: as a SQL function it is planned at each call
(about 1.4 ms of its time here); archiving keeps the partitions few.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.ledger import Ledger
from gateway.ledger.archive import JournalArchive

TOKEN_TYPE = "general"
ALLOWANCE = 1000
PURCHASED = 100  # left in each account once its history is written
HISTORY_CHUNKS = 24  # one INSERT per half month of history

# Organizations and accounts, each account's grant (what its history will spend, plus
# PURCHASED) and refresh (this month's allowance), as gw_create_org and gw_grant would.
SEED_ORGANIZATIONS = """
INSERT INTO organizations (id, plan, billing_anchor, created_at)
    SELECT 'org-' || g, 'bench', $2, $2 FROM generate_series(0, $1 - 1) g
"""
SEED_ACCOUNTS = """
INSERT INTO accounts (org_id, token_type, allowance, purchased, allocated, period_start,
        period_end)
    SELECT 'org-' || g, $2, $3, $4, $3, $5, $6 FROM generate_series(0, $1 - 1) g
"""
SEED_JOURNAL = """
INSERT INTO journal (at, org_id, token_type, kind, allowance_delta, purchased_delta, actor,
        reason)
    SELECT $2::timestamptz, 'org-' || g, $3::text, 'grant', 0, $5::bigint, 'bench', 'pack'
    FROM generate_series(0, $1 - 1) g
    UNION ALL
    SELECT $6::timestamptz, 'org-' || g, $3, 'refresh', $4::bigint, 0, 'ledger',
           'allowance of plan bench'
    FROM generate_series(0, $1 - 1) g
"""

# History rows lo..hi-1 of `total`, evenly spread over [start, finish): each a committed
# reservation of one purchased token, with its reserve and commit rows.
HISTORY = """
WITH made AS (
    INSERT INTO reservations (org_id, token_type, amount, from_allowance, from_purchased,
            period_start, state, charged, route, user_id, created_at, expires_at,
            settled_at)
        SELECT 'org-' || (g % $4), $7, 1, 0, 1, gw_month(t.at, 0), 'committed', 1, 'bench',
               'user-' || (g % 7), t.at, t.at + interval '1 minute',
               t.at + interval '1 second'
        FROM generate_series($1::bigint, $2::bigint - 1) g,
             LATERAL (SELECT $5::timestamptz + ($6::timestamptz - $5::timestamptz)
                             * (g::float8 / $3) AS at) t
        ORDER BY g
        RETURNING id, org_id, route, user_id, created_at, settled_at
)
INSERT INTO journal (at, org_id, token_type, kind, purchased_delta, reserved_delta,
        reservation_id, route, user_id, actor)
    SELECT v.at, m.org_id, $7, v.kind, v.purchased, v.reserved, m.id, m.route, m.user_id,
           v.actor
    FROM made m, LATERAL (VALUES (m.created_at, 'reserve', -1, 1, m.user_id),
                                 (m.settled_at, 'commit', 0, -1, 'gateway'))
                          AS v(at, kind, purchased, reserved, actor)
    ORDER BY v.at
"""


# What autovacuum would get to soon after a bulk load or a prune: measured after it, so
# that the figures are the steady state's, not the backlog's.
VACUUM = "VACUUM (ANALYZE) organizations, accounts, reservations, journal"
WARM_UP = 200  # pairs before each measurement, not counted


async def settle(conn: asyncpg.Connection) -> float:
    """Vacuum and analyze, and flush dirty pages when allowed. Returns the seconds taken."""
    started = time.perf_counter()
    await conn.execute(VACUUM)
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(ledger: Ledger, orgs: int, pairs: int, stats: int, seed: int) -> str:
    """p50 / p99 of sequential reserve+commit pairs and of gw_usage, in ms."""
    rng = random.Random(seed)
    pair_ms: list[float] = []
    for n in range(WARM_UP + pairs):
        org = f"org-{rng.randrange(orgs)}"
        started = time.perf_counter()
        held = await ledger.reserve(org, TOKEN_TYPE, 1, ttl_seconds=60)
        assert held.reservation_id is not None, held
        await ledger.commit(held.reservation_id)
        if n >= WARM_UP:
            pair_ms.append((time.perf_counter() - started) * 1000)
    now = datetime.now(UTC)
    period_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    usage_ms: list[float] = []
    for _ in range(stats):
        org = f"org-{rng.randrange(orgs)}"
        started = time.perf_counter()
        await ledger.usage(org, since=period_start, burn_since=now - timedelta(days=7))
        usage_ms.append((time.perf_counter() - started) * 1000)
    return (
        f"{percentile(pair_ms, 0.5):6.1f} / {percentile(pair_ms, 0.99):5.1f} ms"
        f" (mean {statistics.fmean(pair_ms):.1f})   "
        f"{percentile(usage_ms, 0.5):5.2f} / {percentile(usage_ms, 0.99):5.2f} ms"
    )


async def measure_round(
    conn: asyncpg.Connection, ledger: Ledger, args: argparse.Namespace, seed: int
) -> int:
    """One line per round of measurements; returns the journal's rows."""
    rows = int(await conn.fetchval("SELECT count(*) FROM journal"))
    for n in range(args.rounds):
        figures = await measure(ledger, args.orgs, args.pairs, args.stats, seed * 100 + n)
        print(f"{rows:>12,}   {figures}")
    return rows


async def run(args: argparse.Namespace) -> int:
    dsn: str = args.database_url
    schema = f"bench_size_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    archive_dir = Path(tempfile.mkdtemp(prefix="bench-size-"))
    ledger = await Ledger.connect(dsn, schema=schema, max_size=4, timeout=600)
    conn = await asyncpg.connect(
        dsn,
        server_settings={
            "search_path": schema,
            "timezone": "UTC",
            "synchronous_commit": "off",
            "work_mem": "256MB",
            "maintenance_work_mem": "512MB",
        },
        command_timeout=3600,
    )
    try:
        await ledger.migrate()
        await ledger.sync_plans({"bench": ("month", {TOKEN_TYPE: ALLOWANCE})})
        now = datetime.now(UTC)
        this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        start = this_month - timedelta(days=365)
        anchor = datetime(start.year, start.month, 1, tzinfo=UTC)  # periods: calendar months
        next_month = (this_month + timedelta(days=32)).replace(day=1)
        # History rows per account: the journal reaches --rows with the seed's two.
        per_org = max(0, (args.rows - 2 * args.orgs) // (2 * args.orgs))
        total = per_org * args.orgs
        # Months from the anchor on get their partitions before any row is written.
        await conn.fetchval("SELECT gw_ensure_journal_partitions($1, 16)", anchor)

        t = time.perf_counter()
        purchased = PURCHASED + per_org
        await conn.execute(SEED_ORGANIZATIONS, args.orgs, anchor)
        await conn.execute(
            SEED_ACCOUNTS, args.orgs, TOKEN_TYPE, ALLOWANCE, purchased, this_month, next_month
        )
        await conn.execute(
            SEED_JOURNAL, args.orgs, anchor, TOKEN_TYPE, ALLOWANCE, purchased, this_month
        )
        print(f"seeded {args.orgs:,} organizations in {time.perf_counter() - t:.1f} s")
        print(f"vacuumed in {await settle(conn):.0f} s")
        print("journal rows   reserve+commit p50 / p99          gw_usage p50 / p99")
        await measure_round(conn, ledger, args, 1)

        t = time.perf_counter()
        for chunk in range(HISTORY_CHUNKS):
            lo, hi = total * chunk // HISTORY_CHUNKS, total * (chunk + 1) // HISTORY_CHUNKS
            await conn.execute(HISTORY, lo, hi, total, args.orgs, start, now, TOKEN_TYPE)
        await conn.execute(
            "UPDATE accounts SET purchased = purchased - $1 WHERE token_type = $2",
            per_org,
            TOKEN_TYPE,
        )
        print(
            f"wrote {2 * total:,} history rows ({total:,} reservations) in "
            f"{time.perf_counter() - t:.0f} s; vacuumed in {await settle(conn):.0f} s"
        )
        rows = await measure_round(conn, ledger, args, 2)

        t = time.perf_counter()
        violations = await ledger.audit()
        print(
            f"audit at {rows:,} rows: {len(violations)} violation(s) in "
            f"{time.perf_counter() - t:.0f} s"
        )
        for v in violations[:5]:
            print(f"  {v}")

        if args.archive_months:
            cut = datetime(anchor.year, anchor.month, 1, tzinfo=UTC)
            for _ in range(args.archive_months):
                cut = (cut + timedelta(days=32)).replace(day=1)
            t = time.perf_counter()
            report = await JournalArchive.of(ledger).archive(
                cut, archive_dir, drop=True, actor="bench"
            )
            exported = sum(a.rows for a in report.archived)
            print(
                f"archived {len(report.archived)} month(s) before {cut:%Y-%m} ({exported:,} "
                f"rows, checkpoint of {report.accounts:,} accounts, {report.pruned:,} "
                f"reservations pruned) in {time.perf_counter() - t:.0f} s"
            )
            print(f"vacuumed in {await settle(conn):.0f} s")
            await measure_round(conn, ledger, args, 3)
            t = time.perf_counter()
            violations = await ledger.audit()
            print(
                f"audit after archiving: {len(violations)} violation(s) in "
                f"{time.perf_counter() - t:.0f} s"
            )
        return 0
    finally:
        await conn.close()
        await ledger.close()
        shutil.rmtree(archive_dir, ignore_errors=True)
        if args.keep:
            print(f"kept schema {schema}")
        else:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=10_000_000, help="journal rows to reach")
    parser.add_argument("--pairs", type=int, default=2000, help="reserve+commit pairs measured")
    parser.add_argument("--stats", type=int, default=500, help="gw_usage calls measured")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per size")
    parser.add_argument(
        "--archive-months", type=int, default=2, help="oldest months to archive (0: none)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the schema")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    if not args.database_url:
        parser.error("set DATABASE_URL or pass --database-url")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

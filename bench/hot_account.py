"""One hot account: durable reserve+commit pairs per second through the ledger seam.

Many concurrent callers reserve and commit against ONE organization's account, as a
popular organization's users would; every pair is a real reservation with its own journal
rows, durable before its reserve returns. The run ends with the ledger's audit and a check
that the balance fell by exactly the pairs counted.

    .venv/bin/python bench/hot_account.py [--seconds 5] [--concurrency 128]
        [--database-url URL]      (default: $DATABASE_URL)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass

import asyncpg

from gateway.ledger import Ledger


@dataclass(frozen=True)
class HotAccount:
    pairs: int
    seconds: float
    concurrency: int
    violations: int

    @property
    def per_second(self) -> float:
        return self.pairs / self.seconds


async def hot_account(dsn: str, *, seconds: float = 5.0, concurrency: int = 128) -> HotAccount:
    """Run the hot-account load in a schema of its own (dropped afterwards)."""
    schema = f"bench_hot_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    ledger = await Ledger.connect(dsn, schema=schema, max_size=20)
    try:
        await ledger.migrate()
        await ledger.sync_plans({"bench": ("month", {"general": 1})})
        await ledger.create_org("hot", "bench")
        start_balance = 10**12
        await ledger.grant("hot", "general", start_balance)
        pairs = 0
        stop = time.monotonic() + seconds

        async def caller(n: int) -> None:
            nonlocal pairs
            while time.monotonic() < stop:
                outcome = await ledger.reserve(
                    "hot", "general", 1, ttl_seconds=60, route="bench", user=f"u{n}"
                )
                assert outcome.status == "ok" and outcome.reservation_id is not None
                await ledger.commit(outcome.reservation_id, actor=f"u{n}")
                pairs += 1

        started = time.monotonic()
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        elapsed = time.monotonic() - started
        violations = await ledger.audit()
        available = next(a.available for a in await ledger.balances("hot"))
        if available != start_balance + 1 - pairs:
            raise AssertionError(f"balance {available} after {pairs} pairs: tokens went missing")
        return HotAccount(pairs, elapsed, concurrency, len(violations))
    finally:
        await ledger.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("give --database-url or set DATABASE_URL")
    result = asyncio.run(
        hot_account(args.database_url, seconds=args.seconds, concurrency=args.concurrency)
    )
    print(
        f"hot account: {result.per_second:.0f} reserve+commit pairs/s "
        f"({result.pairs} pairs in {result.seconds:.1f}s, {result.concurrency} callers), "
        f"audit violations: {result.violations}"
    )
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())

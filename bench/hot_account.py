"""One hot account: durable reserve+commit pairs per second through the ledger seam.

Many concurrent callers reserve and commit against ONE organization's account, as a
popular organization's users would; every pair is a real reservation with its own journal
rows, durable before its reserve returns. The run ends with the ledger's audit and a check
that the balance fell by exactly the pairs counted. With ``leased``, the holds are made as
a gateway's leases make them (``Ledger.reserve_holds``, 64 a round trip) and each caller
commits one: the same durable pairs, one account, under leases.

    .venv/bin/python bench/hot_account.py [--seconds 5] [--concurrency 128] [--leased]
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
    leased: bool = False

    @property
    def per_second(self) -> float:
        return self.pairs / self.seconds


LEASE_HOLDS = 64  # holds per reserve_holds call, as a lease's max_holds (the bench's rules)


async def hot_account(
    dsn: str, *, seconds: float = 5.0, concurrency: int = 128, leased: bool = False
) -> HotAccount:
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

        holds: asyncio.Queue[uuid.UUID] = asyncio.Queue()

        async def lease() -> None:
            while time.monotonic() < stop:
                if holds.qsize() >= 2 * LEASE_HOLDS:  # as a lease, make them as drawn
                    await asyncio.sleep(0.001)
                    continue
                made = await ledger.reserve_holds(
                    LEASE_HOLDS, "hot", "general", 1, ttl_seconds=60, route="bench", user="u"
                )
                assert len(made) == LEASE_HOLDS
                for hold in made:
                    assert hold.reservation_id is not None
                    holds.put_nowait(hold.reservation_id)

        async def caller(n: int) -> None:
            nonlocal pairs
            while time.monotonic() < stop:
                if leased:
                    try:
                        reservation = await asyncio.wait_for(holds.get(), 1.0)
                    except TimeoutError:
                        continue
                else:
                    outcome = await ledger.reserve(
                        "hot", "general", 1, ttl_seconds=60, route="bench", user=f"u{n}"
                    )
                    assert outcome.status == "ok" and outcome.reservation_id is not None
                    reservation = outcome.reservation_id
                await ledger.commit(reservation, actor=f"u{n}")
                pairs += 1

        started = time.monotonic()
        leasing = [lease() for _ in range(2)] if leased else []
        await asyncio.gather(*leasing, *(caller(n) for n in range(concurrency)))
        elapsed = time.monotonic() - started
        while not holds.empty():  # holds nobody drew go back, as a lease gives them back
            await ledger.refund(holds.get_nowait(), reason="lease: not drawn")
        violations = await ledger.audit()
        available = next(a.available for a in await ledger.balances("hot"))
        if available != start_balance + 1 - pairs:
            raise AssertionError(f"balance {available} after {pairs} pairs: tokens went missing")
        return HotAccount(pairs, elapsed, concurrency, len(violations), leased)
    finally:
        await ledger.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--leased", action="store_true", help="holds made as leases make them")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("give --database-url or set DATABASE_URL")
    result = asyncio.run(
        hot_account(
            args.database_url,
            seconds=args.seconds,
            concurrency=args.concurrency,
            leased=args.leased,
        )
    )
    print(
        f"hot account: {result.per_second:.0f} reserve+commit pairs/s "
        f"({result.pairs} pairs in {result.seconds:.1f}s, {result.concurrency} callers), "
        f"audit violations: {result.violations}"
    )
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())

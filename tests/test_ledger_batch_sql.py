"""The set-based batch functions (sql/batch.sql) against their single-call functions: twin
organizations, one served by one batch, the other by the same calls one after another,
must get the same answers, balances and journal rows, whatever the batch mixes: balance
running out, allowance then purchased tokens, idempotency keys, refused gates, a new
account, settled and foreign reservations, usage above the hold, a plan change, a new
period. And a batch holding a commit waits for its WAL flush."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.ledger import Ledger
from gateway.ledger.ledger import _RESERVE, _SETTLE
from tests.conftest import Clock

# A reserve call: amount, token type, idempotency key, route plans (comma-joined), user.
Reserve = tuple[int, str, str | None, str | None, str]
# A settle call: index of the reservation (or None: one that does not exist), outcome,
# charged, usage, the organization it is settled as (None: its own).
Settle = tuple[int | None, str, int | None, dict[str, int] | None, str | None]

TWINS = ("batched", "serial")


@pytest.fixture
async def conn(database_url: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    yield conn
    await conn.close()


async def _twins(ledger: Ledger, conn: asyncpg.Connection, clock: Clock) -> None:
    now = clock()  # one billing anchor, so one period for both
    for org in TWINS:
        assert await conn.fetchval("SELECT gw_create_org($1, 'pro', $2)", org, now) == "ok"
        await ledger.grant(org, "general", 5)  # and 5 purchased


def _reserve_args(org: str, calls: Sequence[Reserve], now: datetime) -> list[tuple[Any, ...]]:
    return [
        (org, token_type, amount, plans, "chat", user, f"r{n}", key and f"{org}-{key}", 60.0,
         now, None, 14, None, "proxy", key and "fingerprint")
        for n, (amount, token_type, key, plans, user) in enumerate(calls)
    ]  # fmt: skip


async def _reserve_twins(
    conn: asyncpg.Connection, calls: Sequence[Reserve], now: datetime
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    batched = await conn.fetch(
        _RESERVE.many, *map(list, zip(*_reserve_args("batched", calls, now), strict=True))
    )
    serial = [
        (await conn.fetch(_RESERVE.single, *args))[0]
        for args in _reserve_args("serial", calls, now)
    ]
    return batched, serial


def _settle_args(
    org: str, ids: Sequence[uuid.UUID | None], calls: Sequence[Settle], now: datetime
) -> list[tuple[Any, ...]]:
    return [
        (ids[i] if i is not None else uuid.uuid4(), outcome, charged, now, "tester",
         "failed" if outcome == "refund" else None, as_org or org, "proxy",
         json.dumps(usage) if usage is not None else None)
        for i, outcome, charged, usage, as_org in calls
    ]  # fmt: skip


async def _settle_twins(
    conn: asyncpg.Connection,
    ids: dict[str, list[uuid.UUID | None]],
    calls: Sequence[Settle],
    now: datetime,
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    batched = await conn.fetch(
        _SETTLE.many,
        *map(list, zip(*_settle_args("batched", ids["batched"], calls, now), strict=True)),
    )
    serial = [
        (await conn.fetch(_SETTLE.single, *args))[0]
        for args in _settle_args("serial", ids["serial"], calls, now)
    ]
    return batched, serial


def _same_answers(
    batched: Sequence[asyncpg.Record], serial: Sequence[asyncpg.Record], skip: set[str]
) -> None:
    assert len(batched) == len(serial)
    for n, (b, s) in enumerate(zip(batched, serial, strict=True)):
        mine = {k: v for k, v in dict(b).items() if k not in skip}
        theirs = {k: v for k, v in dict(s).items() if k not in skip}
        if "org_id" in mine and mine["org_id"] is not None:
            assert (mine.pop("org_id"), theirs.pop("org_id")) == TWINS, n
        assert mine == theirs, f"call {n}"
        if "reservation_id" in skip:
            assert (b["reservation_id"] is None) == (s["reservation_id"] is None), n


async def _same_books(conn: asyncpg.Connection) -> None:
    """The twins' accounts, reservations and journal rows are the same, row for row."""
    for query in (
        "SELECT token_type, allowance, purchased, reserved, allocated, overdrawn, period_start"
        " FROM accounts WHERE org_id = $1 ORDER BY token_type",
        "SELECT token_type, amount, from_allowance, from_purchased, state, charged, unbilled,"
        " usage, request_id, user_id FROM reservations WHERE org_id = $1 ORDER BY request_id,"
        " created_at",
        "SELECT token_type, kind, allowance_delta, purchased_delta, reserved_delta, route,"
        " user_id, actor, reason, request_id, unbilled FROM journal WHERE org_id = $1"
        " ORDER BY id",
    ):
        batched = [dict(r) for r in await conn.fetch(query, TWINS[0])]
        serial = [dict(r) for r in await conn.fetch(query, TWINS[1])]
        assert batched == serial, query


def _ids(rows: Sequence[asyncpg.Record]) -> list[uuid.UUID | None]:
    return [r["reservation_id"] for r in rows]


async def test_a_reserve_batch_answers_and_writes_as_its_calls_one_by_one(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock
) -> None:
    await _twins(ledger, conn, clock)
    calls: list[Reserve] = [
        (40, "general", None, None, "ann"),
        (40, "general", None, None, "bob"),
        (1, "general", "k1", None, "ann"),  # an idempotency key: gw_reserve itself
        (14, "general", None, None, "ann"),  # the last of the allowance
        (1, "general", "k1", None, "ann"),  # the key again: duplicate
        (8, "general", None, None, "bob"),  # allowance 5, then 3 purchased
        (9, "general", None, None, "bob"),  # 2 left: insufficient
        (1, "general", None, "enterprise", "ann"),  # not on this plan
        (3, "forecast", None, None, "ann"),  # an account created by the batch
        (2, "general", None, None, "cid"),
        (1, "general", None, None, "cid"),  # nothing left
    ]
    batched, serial = await _reserve_twins(conn, calls, clock())
    assert [r["status"] for r in batched] == [
        "ok", "ok", "ok", "ok", "duplicate", "ok", "insufficient", "plan_forbidden", "ok",
        "ok", "insufficient",
    ]  # fmt: skip
    assert [(r["from_allowance"], r["from_purchased"]) for r in batched[5:7]] == [(5, 3), (0, 0)]
    assert batched[4]["reservation_id"] == batched[2]["reservation_id"]
    _same_answers(batched, serial, {"reservation_id"})
    await _same_books(conn)


async def test_a_reserve_batch_with_a_quota_or_across_a_period_end_is_exact(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock
) -> None:
    await _twins(ledger, conn, clock)
    for org in TWINS:
        await ledger.set_quota(org, "user:ann", "general", 30, actor="test")
    calls: list[Reserve] = [(20, "general", None, None, "ann")] * 2 + [
        (20, "general", None, None, "bob")
    ]
    batched, serial = await _reserve_twins(conn, calls, clock())
    assert [r["status"] for r in batched] == ["ok", "quota_exceeded", "ok"]
    _same_answers(batched, serial, {"reservation_id"})
    # Calls dated after the period's end: the account is refreshed, as gw_reserve does.
    period_end = batched[0]["period_end"]
    batched, serial = await _reserve_twins(
        conn, [(50, "general", None, None, "bob")] * 3, period_end + timedelta(seconds=1)
    )
    assert [r["status"] for r in batched] == ["ok", "ok", "insufficient"]
    assert batched[0]["period_end"] > period_end
    _same_answers(batched, serial, {"reservation_id"})
    await _same_books(conn)


async def test_a_settle_batch_answers_and_writes_as_its_calls_one_by_one(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock
) -> None:
    await _twins(ledger, conn, clock)
    reserved, serial_reserved = await _reserve_twins(
        conn, [(10, "general", None, None, f"u{n}") for n in range(9)], clock()
    )
    ids = {"batched": _ids(reserved), "serial": _ids(serial_reserved)}
    # Already settled before the batch.
    await _settle_twins(conn, ids, [(0, "commit", None, None, None)], clock())
    for org in TWINS:
        await ledger.set_plan(org, "starter", actor="test")  # the held allowance overdraws it
    calls: list[Settle] = [
        (1, "commit", None, None, None),
        (2, "commit", 4, None, None),  # part charged, the rest released: pays off first
        (3, "refund", None, None, None),
        (4, "commit", 25, {"total_tokens": 25}, None),  # usage above the hold
        (5, "commit", 11, None, None),  # above the hold without usage
        (6, "commit", None, None, "someone-else"),  # another organization's: not found
        (None, "commit", None, None, None),  # no such reservation
        (0, "refund", None, None, None),  # already committed
        (7, "commit", 99, {"total_tokens": 99}, None),  # more than the balance: unbilled
    ]
    batched, serial = await _settle_twins(conn, ids, calls, clock())
    assert [r["status"] for r in batched] == [
        "ok", "ok", "ok", "ok", "exceeds_amount", "not_found", "not_found",
        "already_committed", "ok",
    ]  # fmt: skip
    assert batched[8]["unbilled"] > 0
    _same_answers(batched, serial, set())
    await _same_books(conn)


async def test_a_settle_batch_after_a_new_period_lapses_as_one_by_one(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock
) -> None:
    await _twins(ledger, conn, clock)
    reserved, serial_reserved = await _reserve_twins(
        conn, [(10, "general", None, None, f"u{n}") for n in range(3)], clock()
    )
    ids = {"batched": _ids(reserved), "serial": _ids(serial_reserved)}
    later = reserved[0]["period_end"] + timedelta(hours=1)
    await _reserve_twins(conn, [(1, "general", None, None, "new")], later)  # the refresh
    calls: list[Settle] = [
        (0, "refund", None, None, None),
        (1, "commit", 3, None, None),
        (2, "expire", None, None, None),
    ]
    batched, serial = await _settle_twins(conn, ids, calls, later)
    assert [r["status"] for r in batched] == ["ok"] * 3
    _same_answers(batched, serial, set())
    await _same_books(conn)
    lapses = await conn.fetchval(
        "SELECT count(*) FROM journal WHERE org_id = 'batched' AND kind = 'lapse'"
        " AND reservation_id IS NOT NULL"
    )
    assert lapses == 3


async def test_a_reservation_named_twice_in_one_batch_is_settled_once(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock
) -> None:
    await _twins(ledger, conn, clock)
    reserved, serial_reserved = await _reserve_twins(
        conn, [(10, "general", None, None, "ann")], clock()
    )
    ids = {"batched": _ids(reserved), "serial": _ids(serial_reserved)}
    calls: list[Settle] = [(0, "commit", None, None, None), (0, "refund", None, None, None)]
    batched, serial = await _settle_twins(conn, ids, calls, clock())
    assert [r["status"] for r in batched] == ["ok", "already_committed"]
    _same_answers(batched, serial, set())
    await _same_books(conn)


@pytest.mark.parametrize(
    ("outcomes", "flushed"),
    [(("refund", "expire"), "off"), (("refund", "commit"), "on"), (("commit", "refund"), "on")],
)
async def test_a_settle_batch_holding_a_commit_waits_for_its_flush(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock, outcomes: tuple[str, str], flushed: str
) -> None:
    """A refund or an expiry lost in a crash is refunded again at its expiry, so a batch of
    them need not wait for its WAL flush; a commit lost would be an answer delivered
    unpaid, so a batch holding one waits, whatever else it holds."""
    await _twins(ledger, conn, clock)
    reserved, _ = await _reserve_twins(
        conn, [(1, "general", None, None, "ann"), (1, "general", None, None, "bob")], clock()
    )
    args = _settle_args(
        "batched",
        _ids(reserved),
        [(n, outcome, None, None, None) for n, outcome in enumerate(outcomes)],
        clock(),
    )
    assert await conn.fetchval("SHOW synchronous_commit") == "on"
    async with conn.transaction():
        rows = await conn.fetch(_SETTLE.many, *map(list, zip(*args, strict=True)))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        assert await conn.fetchval("SHOW synchronous_commit") == flushed
    assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def _blocked_on_a_lock(watcher: asyncpg.Connection, blocked: asyncpg.Connection) -> None:
    pid = blocked.get_server_pid()
    for _ in range(500):
        if await watcher.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batch never waited for the account's lock")


async def test_a_settle_batch_adds_what_others_moved_before_its_lock(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock, database_url: str, schema: str
) -> None:
    """A settle batch reads its account without locking it and locks it last, for its one
    UPDATE: a reserve committed in between is kept, and the batch's answers include it."""
    await _twins(ledger, conn, clock)
    reserved, _ = await _reserve_twins(
        conn, [(10, "general", None, None, "ann"), (20, "general", None, None, "bob")], clock()
    )
    other = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        tx = other.transaction()
        await tx.start()
        # Another gateway's reserve holds the account (allowance 70 -> 63) until it commits.
        (held,) = await other.fetch(
            _RESERVE.single,
            *_reserve_args("batched", [(7, "general", None, None, "cid")], clock())[0],
        )
        assert held["allowance"] == 63
        args = _settle_args(
            "batched",
            _ids(reserved),
            [(0, "commit", 4, None, None), (1, "refund", None, None, None)],
            clock(),
        )
        batch = asyncio.create_task(conn.fetch(_SETTLE.many, *map(list, zip(*args, strict=True))))
        await _blocked_on_a_lock(other, conn)
        await tx.commit()
        rows = await batch
    finally:
        await other.close()
    # Released 6 then 20 on top of the 63 the other reserve left.
    assert [(r["status"], r["allowance"]) for r in rows] == [("ok", 69), ("ok", 89)]
    (account,) = [a for a in await ledger.balances("batched") if a.token_type == "general"]
    assert (account.available, account.reserved) == (89 + 5, 7)


async def test_a_settle_batch_whose_account_changed_period_before_its_lock_is_refused(
    ledger: Ledger, conn: asyncpg.Connection, clock: Clock, database_url: str, schema: str
) -> None:
    """Its rows were written for the period it read: refused whole (and run again call by
    call by the coalescer), never applied to another period."""
    await _twins(ledger, conn, clock)
    reserved, _ = await _reserve_twins(conn, [(10, "general", None, None, "ann")], clock())
    other = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        tx = other.transaction()
        await tx.start()
        later = reserved[0]["period_end"] + timedelta(hours=1)
        await other.execute("SELECT gw_touch_account('batched', 'general', $1)", later)
        args = _settle_args("batched", _ids(reserved), [(0, "refund", None, None, None)], later)
        batch = asyncio.create_task(conn.fetch(_SETTLE.many, *map(list, zip(*args, strict=True))))
        await _blocked_on_a_lock(other, conn)
        await tx.commit()
        with pytest.raises(asyncpg.SerializationError):
            await batch
    finally:
        await other.close()
    # Run alone, the refund lets the old period's allowance lapse.
    (row,) = await conn.fetch(_SETTLE.single, *args[0])
    assert row["status"] == "ok"
    kinds = await conn.fetch(
        "SELECT kind FROM journal WHERE reservation_id = $1 ORDER BY id", _ids(reserved)[0]
    )
    assert [r["kind"] for r in kinds] == ["reserve", "refund", "lapse"]

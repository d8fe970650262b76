"""The red team's money holes (issue 10): each test reproduces one against real PostgreSQL,
Redis and a local upstream, and asserts who paid, not only that the journal adds up."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gateway.auth import mint_token
from tests.conftest import SECRET, Clock, Gateway, bearer

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_a_proxied_reservation_cannot_be_settled_through_the_api(gateway: Gateway) -> None:
    """Item 1: the caller sees X-Reservation-Id while the answer streams; settling it
    through the two-phase API is refused as if it did not exist, and the answer is paid."""
    before = await gateway.available("acme", "general")
    resp = await gateway.client.post("/v1/chat/stream?behave=sse", json=CHAT, headers=bearer())
    assert resp.status == 200
    rid = resp.headers["X-Reservation-Id"]
    for action, body in (("refund", {}), ("commit", {"charged": 0})):
        attempt = await gateway.client.post(
            f"/v1/tokens/reservations/{rid}/{action}", json=body, headers=bearer()
        )
        problem = await attempt.json()
        assert attempt.status == 404 and problem["code"] == "no_reservation", problem
    gateway.upstream.sse_gate.set()
    text = await resp.text()
    assert "[DONE]" in text
    await gateway.settled()
    import uuid

    reservation = await gateway.ledger.reservation(uuid.UUID(rid))
    assert reservation is not None
    assert (reservation.state, reservation.charged) == ("committed", 1)
    assert await gateway.available("acme", "general") == before - 1


async def test_a_commit_refused_never_delivers_a_complete_answer(
    gateway: Gateway, clock: Clock
) -> None:
    """Item 2: when the commit is refused (here the sweeper expired the hold), the client
    is cut off before the end of the answer and nobody is charged."""
    before = await gateway.available("acme", "general")
    pending = asyncio.create_task(
        gateway.client.post("/v1/chat/x?slow=0.6", json=CHAT, headers=bearer())
    )
    await asyncio.wait_for(gateway.upstream.arrived.wait(), timeout=5)
    clock.advance(seconds=3600)
    assert await gateway.ledger.expire_overdue() == 1
    resp = await pending
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await gateway.settled()
    assert await gateway.available("acme", "general") == before
    kinds = await gateway.journal_kinds("acme")
    assert kinds.count("commit") == 0 and kinds.count("expire") == 1


async def test_an_idempotency_key_is_bound_to_its_request(gateway: Gateway) -> None:
    """Item 5: Bob's deduct of chat with Alice's key is refused and charges nobody."""
    alice = {**bearer("acme", "alice"), "Idempotency-Key": "shared-key"}
    first = await gateway.client.post(
        "/v1/tokens/check-balance", json={"action": "deduct", "feature": "leads"}, headers=alice
    )
    assert first.status == 200 and (await first.json())["charged"] == 5
    leads, general = (
        await gateway.available("acme", "lead_generation"),
        await gateway.available("acme", "general"),
    )
    bob = {**bearer("acme", "bob"), "Idempotency-Key": "shared-key"}
    reused = await gateway.client.post(
        "/v1/tokens/check-balance", json={"action": "deduct", "feature": "chat"}, headers=bob
    )
    problem = await reused.json()
    assert reused.status == 422 and problem["code"] == "idempotency_key_reused", problem
    # Alice's own key with another feature is refused too.
    other = await gateway.client.post(
        "/v1/tokens/check-balance", json={"action": "deduct", "feature": "chat"}, headers=alice
    )
    assert other.status == 422
    assert await gateway.available("acme", "lead_generation") == leads
    assert await gateway.available("acme", "general") == general
    commits = [r for r in await gateway.ledger.journal("acme") if r["kind"] == "commit"]
    assert [(r["user_id"], r["token_type"]) for r in commits] == [("alice", "lead_generation")]


async def test_twenty_concurrent_uses_of_one_key_charge_once(gateway: Gateway) -> None:
    headers = {**bearer(), "Idempotency-Key": "burst"}

    async def deduct() -> tuple[int, dict[str, object]]:
        resp = await gateway.client.post(
            "/v1/tokens/check-balance",
            json={"action": "deduct", "feature": "leads"},
            headers=headers,
        )
        return resp.status, await resp.json()

    answers = await asyncio.gather(*(deduct() for _ in range(20)))
    assert [status for status, _ in answers] == [200] * 20
    assert sorted(bool(body["replayed"]) for _, body in answers) == [False] + [True] * 19
    assert len({body["reservation_id"] for _, body in answers}) == 1
    assert await gateway.available("acme", "lead_generation") == 45
    kinds = await gateway.journal_kinds("acme")
    assert kinds.count("reserve") == 1 and kinds.count("commit") == 1


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),
        ('{"action": "check", "feature": "leads", "n": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"action": "deduct", "feature": "leads", "metadata": {"a": "x\\u0000y"}}', "NUL"),
        ('{"action": "deduct", "feature": "leads", "metadata": {"a": "\\ud800"}}', "surrogate"),
    ],
    ids=["deep", "long-number", "nul-in-metadata", "lone-surrogate"],
)
async def test_hostile_bodies_are_400s(gateway: Gateway, body: str, detail: str) -> None:
    journal = await gateway.journal_kinds("acme")
    resp = await gateway.client.post(
        "/v1/tokens/check-balance",
        data=body.encode(),
        headers={**bearer(), "Content-Type": "application/json"},
    )
    problem = await resp.json()
    assert resp.status == 400 and problem["code"] == "invalid_request", problem
    assert detail in problem["detail"]
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert await gateway.journal_kinds("acme") == journal


async def test_a_charge_beyond_bigint_is_a_400(gateway: Gateway) -> None:
    made = await gateway.client.post(
        "/v1/tokens/reservations", json={"feature": "leads"}, headers=bearer()
    )
    rid = (await made.json())["reservation_id"]
    resp = await gateway.client.post(
        f"/v1/tokens/reservations/{rid}/commit", json={"charged": 2**63}, headers=bearer()
    )
    problem = await resp.json()
    assert resp.status == 400 and problem["code"] == "invalid_request", problem
    done = await gateway.client.post(
        f"/v1/tokens/reservations/{rid}/refund", json={}, headers=bearer()
    )
    assert done.status == 200


@pytest.mark.parametrize(
    ("org", "user", "detail"),
    [("ac\x00me", "alice", "control character"), ("acme", "al\ud800ice", "lone surrogate")],
    ids=["nul-in-org", "surrogate-in-user"],
)
async def test_hostile_claims_are_401s(gateway: Gateway, org: str, user: str, detail: str) -> None:
    token = mint_token(SECRET, org=org, user=user)
    headers = {"Authorization": f"Bearer {token}"}
    for resp in (
        await gateway.client.post("/v1/chat/x", json=CHAT, headers=headers),
        await gateway.client.get("/v1/tokens/stats", headers=headers),
    ):
        problem = await resp.json()
        assert resp.status == 401 and problem["code"] == "invalid_token", problem
        assert detail in problem["detail"]
    assert gateway.upstream.seen == []


async def test_an_absolute_form_target_is_a_400(gateway: Gateway) -> None:
    host, port = gateway.client.host, gateway.client.port
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps(CHAT).encode()
    token = bearer()["Authorization"]
    writer.write(
        f"POST http://evil.example/v1/chat/x HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400"), raw[:300]
    assert b'"invalid_request"' in rest
    assert gateway.upstream.seen == []


async def test_a_token_with_non_ascii_bytes_is_a_401(gateway: Gateway) -> None:
    host, port = gateway.client.host, gateway.client.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /v1/tokens/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
        + b"Authorization: Bearer \xff\xfe.abc.def\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 401"), raw[:300]
    assert b"only ASCII characters" in rest

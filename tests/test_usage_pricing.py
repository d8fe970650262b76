"""Routes priced by what the backend reports: exact charges, holds, overruns, missing usage,
streams cut or abandoned, backend credentials, proxy idempotency, and who paid.

The upstream is tests/upstream.py answering in OpenAI's or Anthropic's format with the
usage the test asks for (``?behave=usage&prompt=3&completion=2``)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.errors import ConfigError
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.proxy import WriteThrough
from gateway.rules import Rules, Usage, UsageConfig, charge, hold_for, parse_rules
from tests.conftest import (
    ENVIRON,
    Gateway,
    bearer,
    cycles_of_requests,
    cyclic_garbage,
    rules_yaml,
)
from tests.upstream import Upstream

SECRET_KEY = "sk-backend-secret-0123456789"
ADMIN_TOKEN = "the-admin-token-0123456789"
USAGE_ROUTES = """\
  - name: metered
    method: POST
    path: /v1/metered/chat
    upstream: keyed
    token_type: general
    usage:
      format: openai
      rates: {input: 1000, output: 2000, cached_input: 500}
      models: {big: {input: 3000, output: 3000}}
      hold: 10
  - name: metered-refund
    method: POST
    path: /v1/metered/refund
    upstream: keyed
    token_type: general
    usage: {format: openai, rates: {input: 1000, output: 1000}, hold: 10, on_missing_usage: refund}
  - name: metered-claude
    method: POST
    path: /v1/metered/messages
    upstream: keyed
    token_type: general
    usage: {format: anthropic, rates: {input: 1000, output: 1000, cached_input: 100}, hold: 10}
  - name: metered-capped
    method: POST
    path: /v1/metered/capped
    upstream: keyed
    token_type: general
    usage: {format: openai, rates: {input: 1000, output: 1000}, hold: 10}
    limits: {tokens: {limit: 25/minute, per: organization}}
  - name: metered-estimate
    method: POST
    path: /v1/metered/estimate
    upstream: keyed
    token_type: general
    usage: {format: openai, rates: {input: 1000, output: 1000}, max_request_bytes: 2000}
"""
KEYED = (
    "upstreams:\n  keyed:\n    url: ${TEST_UPSTREAM_URL}\n    timeout_seconds: 20\n"
    f'    headers: {{Authorization: "Bearer {SECRET_KEY}", X-Backend-Project: proj-7}}\n'
)


@pytest.fixture
def rules(upstream: tuple[Upstream, str]) -> Rules:
    text = rules_yaml(upstream[1], extra_routes=USAGE_ROUTES).replace("upstreams:\n", KEYED, 1)
    return parse_rules(text.replace("${TEST_UPSTREAM_URL}", upstream[1]).encode())


@pytest.fixture
async def gateway(
    ledger: Ledger, limiter: Limiter, rules: Rules, upstream: tuple[Upstream, str]
) -> AsyncIterator[Gateway]:
    await ledger.create_org("acme", "pro")  # 100 general tokens
    await ledger.create_org("bigco", "enterprise")
    await ledger.create_org("tiny", "daily")  # 10 general tokens
    app = build_app(
        rules,
        ledger,
        limiter,
        environ={**ENVIRON, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
        sweeper=False,
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    gw = Gateway(client, ledger, upstream[0], app, upstream[1])
    yield gw
    await gw.settled()
    await client.close()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "small", "messages": [{"role": "user", "content": "hello"}], **extra}


async def reservation(gateway: Gateway, rid: str, org: str = "acme") -> dict[str, Any]:
    resp = await gateway.client.get(f"/v1/tokens/reservations/{rid}", headers=bearer(org))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


# --- the arithmetic ----------------------------------------------------------------------


def test_the_charge_is_exact_and_rounds_up_once() -> None:
    config = UsageConfig.model_validate(
        {"format": "openai", "rates": {"input": 0.1, "output": 0.3, "cached_input": 0.05}}
    )
    # 0.1 * 10000 + 0.05 * 2000 + 0.3 * 3333 = 1000 + 100 + 999.9 -> 2.0999 -> 3
    assert charge(config, Usage(input=10000, cached_input=2000, output=3333)) == 3
    assert charge(config, Usage(input=10000)) == 1  # exactly 1.0: no rounding up
    assert charge(config, Usage(input=10001)) == 2
    assert charge(config, Usage()) == 0


def test_the_hold_is_estimated_from_the_request_when_not_set() -> None:
    config = UsageConfig.model_validate(
        {"format": "openai", "rates": {"input": 1000, "output": 2000}, "default_max_tokens": 100}
    )
    assert hold_for(config, {"max_tokens": 50}, 40) == 10 + 100
    assert hold_for(config, {"max_completion_tokens": 7, "max_tokens": 50}, 4) == 1 + 14
    assert hold_for(config, {}, 0) == 200  # the default output limit


# --- JSON answers ------------------------------------------------------------------------


async def test_a_json_answer_is_charged_exactly_what_the_backend_reported(
    gateway: Gateway,
) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=3&cached=1&completion=2",
        json=chat(),
        headers=bearer(),
    )
    assert resp.status == 200
    await resp.read()
    # 2 uncached input x 1 + 1 cached x 0.5 + 2 output x 2 = 6.5 -> 7
    assert resp.headers["X-Tokens-Charged"] == "7"
    assert resp.headers["X-Tokens-Remaining"] == "93"
    assert await gateway.available("acme", "general") == 93
    assert await gateway.available("bigco", "general") == 1000
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["state"], held["amount"], held["charged"], held["unbilled"]) == (
        "committed",
        10,
        7,
        0,
    )
    assert held["usage"] == {"input": 2, "cached_input": 1, "output": 2, "model": "small"}


async def test_a_usage_priced_exchange_leaves_no_reference_cycle(gateway: Gateway) -> None:
    """Read for its usage, as JSON or as a stream, a request is still freed by reference
    counting alone (see test_pipeline's test of the same name)."""
    with cyclic_garbage() as garbage:
        for stream in (False, True):
            resp = await gateway.client.post(
                "/v1/metered/chat?behave=usage&prompt=3&completion=2",
                json=chat(stream=stream, stream_options={"include_usage": True}),
                headers=bearer(),
            )
            assert resp.status == 200
            await resp.read()
        await gateway.settled()
    assert cycles_of_requests(garbage) == []
    assert await gateway.available("acme", "general") == 100 - 7 - 7  # 3 x 1 + 2 x 2 each


async def test_a_listed_model_is_charged_at_its_own_rates(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=1&completion=1",
        json=chat(model="big"),
        headers=bearer(),
    )
    await resp.read()
    assert resp.headers["X-Tokens-Charged"] == "6"
    assert await gateway.available("acme", "general") == 94


async def test_usage_above_the_hold_is_taken_from_the_balance(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=30", json=chat(), headers=bearer()
    )
    await resp.read()
    assert resp.headers["X-Tokens-Charged"] == "30"
    assert await gateway.available("acme", "general") == 70
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["amount"], held["charged"], held["unbilled"]) == (10, 30, 0)


async def test_usage_beyond_the_balance_is_unbilled_never_below_zero(gateway: Gateway) -> None:
    await gateway.ledger.grant("tiny", "general", 5)  # 10 allowance + 5 purchased
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=40", json=chat(), headers=bearer("tiny")
    )
    await resp.read()
    assert resp.status == 200
    assert resp.headers["X-Tokens-Charged"] == "15"
    assert await gateway.available("tiny", "general") == 0
    accounts = {a.token_type: a for a in await gateway.ledger.balances("tiny")}
    assert (accounts["general"].allowance, accounts["general"].purchased) == (0, 0)
    held = await reservation(gateway, resp.headers["X-Reservation-Id"], "tiny")
    assert (held["charged"], held["unbilled"]) == (15, 25)
    commit = next(
        r for r in await gateway.ledger.journal("tiny", limit=50) if r["kind"] == "commit"
    )
    assert commit["unbilled"] == 25
    metrics = await (await gateway.client.get("/metrics")).text()
    assert 'gateway_tokens_total{movement="unbilled",token_type="general"} 25.0' in metrics
    assert await gateway.available("acme", "general") == 100  # nobody else paid
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    owed = await (
        await gateway.client.get("/v1/admin/organizations/tiny/unbilled", headers=admin)
    ).json()
    assert owed["totals"] == {"general": 25} and owed["stripe"] == []
    [row] = owed["usage"]
    assert (row["reservation_id"], row["held"], row["charged"], row["unbilled"]) == (
        resp.headers["X-Reservation-Id"],
        10,
        15,
        25,
    )


async def test_missing_usage_charges_the_hold_or_refunds_as_configured(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&nousage", json=chat(), headers=bearer()
    )
    await resp.read()
    assert (resp.status, resp.headers["X-Tokens-Charged"]) == (200, "10")
    assert await gateway.available("acme", "general") == 90
    resp = await gateway.client.post(
        "/v1/metered/refund?behave=usage&nousage", json=chat(), headers=bearer()
    )
    await resp.read()
    assert (resp.status, resp.headers["X-Tokens-Charged"]) == (200, "0")
    assert await gateway.available("acme", "general") == 90
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert held["state"] == "refunded"


async def test_a_failed_answer_is_never_charged(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/metered/chat?status=500", json=chat(), headers=bearer())
    await resp.read()
    assert (resp.status, resp.headers["X-Tokens-Charged"]) == (500, "0")
    assert await gateway.available("acme", "general") == 100


# --- streams ----------------------------------------------------------------------------


async def test_a_stream_asks_for_usage_relays_every_byte_and_ends_with_its_charge(
    gateway: Gateway,
) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=4&completion=3",
        json=chat(stream=True, stream_options={"include_usage": False}),
        headers=bearer(),
    )
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers["X-Tokens-Held"] == "10"
    assert "X-Tokens-Charged" not in resp.headers
    sent = json.loads(gateway.upstream.seen[-1].body)
    assert sent["stream_options"] == {"include_usage": True}  # forced: it is how we charge
    events = body.split(b"\n\n")
    assert events[-2] == b": tokens-charged=10"  # 4 x 1 + 3 x 2
    assert b'"usage": {"prompt_tokens": 4' in body and b"data: [DONE]" in body
    assert await gateway.available("acme", "general") == 90
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["state"], held["charged"]) == ("committed", 10)


async def test_a_stream_written_through_is_charged_by_the_usage_in_its_chunks(
    gateway: Gateway,
) -> None:
    """Paced events go to the client as they arrive, not through the relay's reads; the
    meter still reads each of them, the last one's usage included."""
    written = WriteThrough.chunks
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=2&completion=1&pause=0.05",
        json=chat(stream=True),
        headers=bearer(),
    )
    body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n: tokens-charged=4\n\n")
    assert WriteThrough.chunks - written >= 3
    assert await gateway.available("acme", "general") == 96  # 2 x 1 + 1 x 2, not the hold of 10
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["state"], held["charged"]) == ("committed", 4)


async def test_a_truthy_stream_flag_still_asks_for_usage(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/refund?behave=usage&prompt=4&completion=3",
        json=chat(stream=1),
        headers=bearer(),
    )
    body = await resp.read()
    assert json.loads(gateway.upstream.seen[-1].body)["stream_options"] == {"include_usage": True}
    assert body.endswith(b": tokens-charged=7\n\n")  # not refunded as "no usage reported"
    assert await gateway.available("acme", "general") == 93


async def test_a_stream_cut_before_its_usage_is_refunded(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=4&completion=3&cut",
        json=chat(stream=True),
        headers=bearer(),
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await gateway.settled()
    assert await gateway.available("acme", "general") == 100
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["state"], held["charged"]) == ("refunded", 0)


async def test_a_client_leaving_a_finished_stream_is_still_charged(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=4&completion=3&pause=0.2",
        json=chat(stream=True),
        headers=bearer(),
    )
    await resp.content.readline()  # the first event, then the client hangs up
    rid = resp.headers["X-Reservation-Id"]
    resp.close()
    await gateway.settled()
    assert await gateway.available("acme", "general") == 90
    held = await reservation(gateway, rid)
    assert (held["state"], held["charged"]) == ("committed", 10)


async def test_anthropic_json_and_stream_are_charged_with_cache_reads(gateway: Gateway) -> None:
    # 4 input x 1 + 10 cache reads x 0.1 + 3 output x 1 = 8
    for stream in (False, True):
        resp = await gateway.client.post(
            "/v1/metered/messages?behave=anthropic&prompt=4&cache_read=10&completion=3",
            json=chat(stream=stream, max_tokens=100),
            headers=bearer(),
        )
        body = await resp.read()
        assert resp.status == 200
        if not stream:
            assert resp.headers["X-Tokens-Charged"] == "8"
        else:
            assert body.endswith(b": tokens-charged=8\n\n")
            assert "stream_options" not in json.loads(gateway.upstream.seen[-1].body)
    assert await gateway.available("acme", "general") == 84


async def test_concurrent_streams_never_overspend_and_charge_what_they_used(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """200 streams at once, each holding 10 of 100 tokens and using 4: the holds decide
    who gets through, nothing is overspent, and each answered stream paid exactly 4."""

    async def one() -> tuple[int, str | None]:
        async with http.post(
            gateway.url("/v1/metered/chat?behave=usage&prompt=4&pause=0.05"),
            json=chat(stream=True),
            headers=bearer(),
        ) as resp:
            body = await resp.read()
            return resp.status, body.decode()

    answers = await asyncio.gather(*(one() for _ in range(200)))
    await gateway.settled()
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 402}
    served = statuses.count(200)
    assert served >= 10
    assert all(body and body.endswith(": tokens-charged=4\n\n") for s, body in answers if s == 200)
    assert await gateway.available("acme", "general") == 100 - 4 * served >= 0
    charged = [r for r in await gateway.ledger.journal("acme", limit=1000) if r["kind"] == "commit"]
    assert len(charged) == served


# --- requests ---------------------------------------------------------------------------


async def test_the_hold_is_estimated_from_the_body_and_bounded(gateway: Gateway) -> None:
    body = json.dumps(chat(max_tokens=50)).encode()
    resp = await gateway.client.post(
        "/v1/metered/estimate?behave=usage&prompt=2&completion=2",
        data=body,
        headers={**bearer(), "Content-Type": "application/json"},
    )
    await resp.read()
    held = await reservation(gateway, resp.headers["X-Reservation-Id"])
    assert (held["amount"], held["charged"]) == (-(-len(body) // 4) + 50, 4)

    seen = len(gateway.upstream.seen)
    huge = await gateway.client.post(
        "/v1/metered/estimate", json=chat(max_tokens=10**30), headers=bearer()
    )
    assert (huge.status, (await huge.json())["code"]) == (402, "insufficient_tokens")
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 3000}])).encode()
    resp = await gateway.client.post("/v1/metered/estimate", data=big, headers=bearer())
    problem = await resp.json()
    assert (resp.status, problem["code"]) == (413, "payload_too_large")
    assert "max_request_bytes" in problem["detail"]
    for bad in (b"{not json", b"[1, 2]"):
        resp = await gateway.client.post("/v1/metered/chat", data=bad, headers=bearer())
        assert (resp.status, (await resp.json())["code"]) == (400, "invalid_request")
    assert len(gateway.upstream.seen) == seen  # none of them forwarded
    assert await gateway.available("acme", "general") == 96


async def test_backend_credentials_replace_the_callers_and_stay_secret(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt = bearer()["Authorization"]
    resp = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=1",
        json=chat(),
        headers={**bearer(), "X-Backend-Project": "forged"},
    )
    await resp.read()
    seen = gateway.upstream.seen[-1].headers
    assert seen.getall("Authorization") == [f"Bearer {SECRET_KEY}"]
    assert seen.getall("X-Backend-Project") == ["proj-7"]
    assert seen["X-Gateway-Organization"] == "acme"
    assert all(jwt.split()[1] not in value for value in seen.values())

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    shown = await (await gateway.client.get("/v1/admin/rules", headers=admin)).text()
    assert SECRET_KEY not in shown
    assert json.loads(shown)["rules"]["upstreams"]["keyed"]["headers"] == {
        "Authorization": "(secret)",
        "X-Backend-Project": "(secret)",
    }
    explained = await gateway.client.get(
        "/v1/admin/explain",
        params={"path": "/v1/metered/chat", "token": jwt.split()[1]},
        headers=admin,
    )
    assert explained.status == 200 and SECRET_KEY not in await explained.text()
    route = (await explained.json())["route"]
    assert (route["usage"], route["cost"]) == ("openai", 10)  # the hold of a bare request
    failed = await gateway.client.post("/v1/metered/chat?status=502", json=chat(), headers=bearer())
    assert SECRET_KEY not in await failed.text()
    assert all(SECRET_KEY not in record.getMessage() for record in caplog.records)


def test_rules_name_an_unset_variable_and_bad_headers_without_echoing_values(
    upstream: tuple[Upstream, str],
) -> None:
    def errors(headers: str) -> list[str]:
        keyed = KEYED.replace(
            f'{{Authorization: "Bearer {SECRET_KEY}", X-Backend-Project: proj-7}}', headers
        )
        text = rules_yaml(upstream[1]).replace("upstreams:\n", keyed, 1)
        with pytest.raises(ConfigError) as info:
            parse_rules(text.replace("${TEST_UPSTREAM_URL}", upstream[1]).encode())
        return info.value.errors

    assert errors('{Authorization: "Bearer ${NO_SUCH_KEY_FOR_TESTS}"}') == [
        "upstreams.keyed.headers.Authorization: environment variable NO_SUCH_KEY_FOR_TESTS "
        "is not set"
    ]
    assert "set by the gateway itself" in errors('{Host: "evil"}')[0]
    assert errors('{"Bad Name": "v"}')[0].endswith("'Bad Name' is not a valid HTTP header name")
    both = rules_yaml(
        upstream[1],
        extra_routes="  - {path: /x, upstream: backend, "
        "token_type: general, cost: 1, usage: {format: openai, "
        "rates: {input: 1, output: 1}}}\n",
    )
    with pytest.raises(ConfigError) as info:
        parse_rules(both.encode())
    assert info.value.errors == [
        "routes[0]: needs exactly one of cost (a fixed price) or usage (priced by what the "
        "backend reports)"
    ]


# --- idempotency on the proxy path ------------------------------------------------------


async def test_a_repeated_idempotency_key_is_not_forwarded_again(gateway: Gateway) -> None:
    headers = {**bearer(), "Idempotency-Key": "retry-1"}
    first = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=5", json=chat(), headers=headers
    )
    await first.read()
    assert first.status == 200
    seen = len(gateway.upstream.seen)
    again = await gateway.client.post(
        "/v1/metered/chat?behave=usage&prompt=5", json=chat(), headers=headers
    )
    problem = await again.json()
    assert again.status == 409
    assert problem["code"] == "duplicate_request"
    assert (problem["reservation_id"], problem["state"], problem["charged"]) == (
        first.headers["X-Reservation-Id"],
        "committed",
        5,
    )
    other_route = await gateway.client.post("/v1/leads/generate", json={}, headers=headers)
    assert (other_route.status, (await other_route.json())["code"]) == (
        422,
        "idempotency_key_reused",
    )
    assert len(gateway.upstream.seen) == seen
    assert await gateway.available("acme", "general") == 95
    assert await gateway.available("acme", "lead_generation") == 50


async def test_concurrent_retries_of_one_key_are_forwarded_and_charged_once(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {**bearer(), "Idempotency-Key": f"k-{uuid.uuid4()}"}

    async def one() -> tuple[int, dict[str, Any] | None]:
        async with http.post(
            gateway.url("/v1/metered/chat?behave=usage&prompt=6&pause=0.05"),
            json=chat(stream=True),
            headers=headers,
        ) as resp:
            if resp.status == 409:
                return 409, await resp.json()
            await resp.read()
            return resp.status, None

    answers = await asyncio.gather(*(one() for _ in range(30)))
    await gateway.settled()
    assert sorted(status for status, _ in answers) == [200] + [409] * 29
    assert len([s for s in gateway.upstream.seen if s.path_qs.startswith("/v1/metered")]) == 1
    assert await gateway.available("acme", "general") == 94
    assert {p["reservation_id"] for _, p in answers if p} == {
        str(r["reservation_id"])
        for r in await gateway.ledger.journal("acme", limit=100)
        if r["kind"] == "commit"
    }


async def test_the_app_answers_a_usage_route_with_no_body(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/metered/chat?behave=usage&prompt=1", headers=bearer())
    await resp.read()
    assert (resp.status, resp.headers["X-Tokens-Charged"]) == (200, "1")


def _unused(_: web.Request) -> None:  # keeps aiohttp.web imported for type hints above
    return None


async def test_token_rate_limits_count_the_charge_not_the_hold(gateway: Gateway) -> None:
    """Cap 25 tokens a minute; each request holds 10 and is charged 4. The window counts
    each hold until its charge replaces it: 4 requests fit (4+4+4+10 = 22), the fifth
    would make 16 + 10 = 26."""
    statuses = []
    for _ in range(5):
        resp = await gateway.client.post(
            "/v1/metered/capped?behave=usage&prompt=4", json=chat(), headers=bearer()
        )
        body = await resp.read()
        statuses.append(resp.status)
        if resp.status == 429:
            problem = json.loads(body)
            assert problem["code"] == "rate_limited"
            assert "25 tokens per 60s" in problem["detail"]
            assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [200, 200, 200, 200, 429]
    assert await gateway.available("acme", "general") == 100 - 16
    # Another organization has its own window.
    resp = await gateway.client.post(
        "/v1/metered/capped?behave=usage&prompt=4", json=chat(), headers=bearer("bigco")
    )
    await resp.read()
    assert resp.status == 200

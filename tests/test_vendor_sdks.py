"""Usage pricing through the vendors' official SDKs: ``openai.AsyncOpenAI`` and
``anthropic.AsyncAnthropic`` pointed at the gateway, the gateway pointed at local stand-ins
of both APIs (tests/vendors.py) that report chosen usage. Each charge is asserted to the
token, on the response, the reservation and the balance; the ledger is audited after
every test (and once through ``gateway audit``)."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai.types.chat import ChatCompletionStreamOptionsParam

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules, parse_rules
from tests.conftest import ENVIRON, Gateway, bearer, process_env, rules_yaml, token
from tests.upstream import Upstream
from tests.vendors import (
    ANSWER,
    ANTHROPIC_KEY,
    BEHAVIOUR,
    DELAY,
    OPENAI_KEY,
    AnthropicUsage,
    OpenAIUsage,
    VendorRequest,
    Vendors,
)

REPO = Path(__file__).parent.parent
HOLD = 200  # the OpenAI route's hold
ANTHROPIC_HOLD = 100
# One prompt for both SDKs, whose message types are distinct TypedDicts of the same shape.
PROMPT: Any = [{"role": "user", "content": "Summarise the quarter in one line."}]
DUMMY_KEY = "sdk-needs-a-key-the-gateway-must-not-forward"

# The vendors' keys come from the environment, as in production (see the ``rules`` fixture).
UPSTREAMS = """\
  openai:
    url: VENDORS_URL
    timeout_seconds: 20
    headers: {Authorization: "Bearer ${OPENAI_API_KEY}"}
  anthropic:
    url: VENDORS_URL
    timeout_seconds: 20
    headers: {x-api-key: "${ANTHROPIC_API_KEY}"}
"""
ROUTES = f"""\
  - name: openai-chat
    method: POST
    path: /v1/chat/completions
    upstream: openai
    token_type: general
    usage:
      format: openai
      rates: {{input: 2, output: 6, cached_input: 1}}
      models: {{big-model: {{input: 10, output: 30}}}}
      hold: {HOLD}
      on_missing_usage: hold
  - name: openai-big-answers
    method: POST
    path: /big-answers/v1/chat/completions
    upstream: openai
    token_type: general
    usage:
      format: openai
      rates: {{input: 2, output: 6}}
      hold: {HOLD}
      max_response_bytes: 100
  - name: anthropic-messages
    method: POST
    path: /v1/messages
    upstream: anthropic
    token_type: general
    usage:
      format: anthropic
      rates: {{input: 3, output: 15, cached_input: 0.3}}
      hold: {ANTHROPIC_HOLD}
      on_missing_usage: refund
"""


def openai_charge(usage: OpenAIUsage, rate_in: int, rate_cached: int, rate_out: int) -> int:
    """The spec's charge, written out independently of the gateway (integers: exact)."""
    total = (
        (usage.prompt_tokens - usage.cached_tokens) * rate_in
        + usage.cached_tokens * rate_cached
        + usage.completion_tokens * rate_out
    )
    return -(-total // 1000)


@pytest.fixture
async def vendors() -> AsyncIterator[tuple[Vendors, str]]:
    backend = Vendors()
    server = TestServer(backend.app(), host="127.0.0.1")
    await server.start_server()
    yield backend, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
def rules_text(
    upstream: tuple[Upstream, str],
    vendors: tuple[Vendors, str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    raw = rules_yaml(upstream[1], extra_routes=ROUTES)
    upstreams = UPSTREAMS.replace("VENDORS_URL", vendors[1])
    return raw.replace("upstreams:\n", "upstreams:\n" + upstreams, 1)


@pytest.fixture
def rules(rules_text: str) -> Rules:
    """Overrides conftest's: the test rules plus the two vendor upstreams and their routes
    (first, so they win over the generic chat route)."""
    return parse_rules(rules_text.encode(), "tests/test_vendor_sdks.py")


@dataclass
class SDKs:
    gateway: Gateway
    vendors: Vendors
    clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = field(default_factory=list)

    def openai(self, org: str = "acme", user: str = "alice") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=self.gateway.url("/v1"),
            api_key=token(org, user),
            max_retries=0,  # a retry would be a second, separately charged request
            timeout=20,
        )
        self.clients.append(client)
        return client

    def anthropic(
        self, org: str = "acme", user: str = "alice", **headers: str
    ) -> anthropic.AsyncAnthropic:
        # The gateway authenticates from Authorization: Bearer <JWT>. The SDK sends its
        # api_key as x-api-key (older versions) or as a bearer token (newer ones): it gets a
        # dummy, which must not travel on, and the explicit Authorization header wins.
        client = anthropic.AsyncAnthropic(
            base_url=self.gateway.url(""),
            api_key=DUMMY_KEY,
            default_headers={**bearer(org, user), **headers},
            max_retries=0,
            timeout=20,
        )
        self.clients.append(client)
        return client

    async def available(self, org: str = "acme") -> int:
        return await self.gateway.available(org, "general")

    async def reservation(self, rid: str, org: str = "acme") -> tuple[int, dict[str, Any]]:
        resp = await self.gateway.client.get(
            f"/v1/tokens/reservations/{rid}", headers=bearer(org, "alice")
        )
        body: dict[str, Any] = json.loads(await resp.read())
        return resp.status, body


@pytest.fixture
async def sdks(
    ledger: Ledger,
    limiter: Limiter,
    rules: Rules,
    upstream: tuple[Upstream, str],
    vendors: tuple[Vendors, str],
) -> AsyncIterator[SDKs]:
    await ledger.create_org("acme", "pro")
    await ledger.create_org("bigco", "enterprise")
    await ledger.grant("acme", "general", 1000, reason="usage-priced tests")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    setup = SDKs(Gateway(client, ledger, upstream[0], app, upstream[1]), vendors[0])
    yield setup
    for sdk in setup.clients:
        await sdk.close()
    await setup.gateway.settled()
    await client.close()


async def parsed(raw: Any) -> Any:
    """``with_raw_response``'s parse: synchronous in some SDK versions, a coroutine in others."""
    result = raw.parse()
    return await result if inspect.isawaitable(result) else result


def only(vendors: Vendors) -> VendorRequest:
    """The one request the vendors received."""
    assert len(vendors.seen) == 1, [(s.path, s.status) for s in vendors.seen]
    return vendors.seen[0]


# -- the stand-ins themselves, through the SDKs, no gateway ------------------------------


async def test_the_stand_ins_answer_the_sdks_directly(vendors: tuple[Vendors, str]) -> None:
    backend, url = vendors
    backend.anthropic_usage = AnthropicUsage(10, 5, 20, 30)
    async with (
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=OPENAI_KEY, max_retries=0) as oa,
        anthropic.AsyncAnthropic(base_url=url, api_key=ANTHROPIC_KEY, max_retries=0) as an,
    ):
        completion = await oa.chat.completions.create(model="m", messages=PROMPT)
        assert completion.choices[0].message.content == ANSWER
        assert completion.usage is not None and completion.usage.prompt_tokens == 1200
        stream = await oa.chat.completions.create(
            model="m",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 300

        message = await an.messages.create(model="c", max_tokens=64, messages=PROMPT)
        assert message.usage.cache_read_input_tokens == 20
        async with an.messages.stream(
            model="c",
            max_tokens=64,
            messages=PROMPT,
            extra_headers={BEHAVIOUR: "multi-delta"},
        ) as events:
            final = await events.get_final_message()
        assert final.content[0].type == "text" and final.content[0].text == ANSWER
        assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 30)

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as raised:
            await bad.chat.completions.create(model="m", messages=PROMPT)
        assert raised.value.code == "invalid_api_key"
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-wrong", max_retries=0) as bad_an:
        with pytest.raises(anthropic.AuthenticationError):
            await bad_an.messages.create(model="c", max_tokens=1, messages=PROMPT)
    assert [s.status for s in backend.seen] == [200, 200, 200, 200, 401, 401]


# -- OpenAI ------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["normal", "chunked"])
async def test_openai_json_is_charged_exactly_by_the_routes_rates(
    sdks: SDKs, behaviour: str
) -> None:
    # 8,000 + 6,000 + 9,006 per 1,000 = 23.006 -> 24: cached input at its own rate, not
    # at the input rate (29) nor counted twice (35), rounded up (not 23).
    sdks.vendors.openai_usage = OpenAIUsage(
        prompt_tokens=10_000, cached_tokens=6_000, completion_tokens=1_501
    )
    assert openai_charge(sdks.vendors.openai_usage, 2, 1, 6) == 24
    before = await sdks.available()
    raw = await sdks.openai().chat.completions.with_raw_response.create(
        model="small-model",
        messages=PROMPT,
        extra_headers={BEHAVIOUR: behaviour},  # with a Content-Length, or chunked
    )
    completion = await parsed(raw)
    assert completion.choices[0].message.content == ANSWER
    assert completion.usage.prompt_tokens_details.cached_tokens == 6_000
    assert raw.headers["X-Tokens-Charged"] == "24"
    rid = raw.headers["X-Reservation-Id"]
    assert await sdks.available() == before - 24
    status, reservation = await sdks.reservation(rid)
    assert status == 200, reservation
    assert reservation["state"] == "committed"
    assert (reservation["charged"], reservation["amount"]) == (24, HOLD)
    assert reservation["usage"] == {
        "input": 4_000,
        "cached_input": 6_000,
        "output": 1_501,
        "model": "small-model",
    }
    assert (await sdks.gateway.journal_kinds("acme"))[-2:] == ["reserve", "commit"]


async def test_openai_json_model_listed_under_models_uses_its_rates(sdks: SDKs) -> None:
    # big-model: input 10, output 30, no cached_input -> cached at its input rate 10:
    # 40,000 + 60,000 + 45,030 per 1,000 = 145.03 -> 146.
    sdks.vendors.openai_usage = OpenAIUsage(10_000, 6_000, 1_501)
    assert openai_charge(sdks.vendors.openai_usage, 10, 10, 30) == 146
    before = await sdks.available()
    raw = await sdks.openai().chat.completions.with_raw_response.create(
        model="big-model",
        messages=PROMPT,
    )
    await parsed(raw)
    assert raw.headers["X-Tokens-Charged"] == "146"
    assert await sdks.available() == before - 146
    _, reservation = await sdks.reservation(raw.headers["X-Reservation-Id"])
    assert reservation["usage"]["model"] == "big-model"
    assert reservation["charged"] == 146


async def test_a_charge_over_the_hold_takes_the_excess_from_the_balance(sdks: SDKs) -> None:
    sdks.vendors.openai_usage = OpenAIUsage(20_000, 0, 2_000)  # big-model: 200 + 60 = 260
    before = await sdks.available()
    raw = await sdks.openai().chat.completions.with_raw_response.create(
        model="big-model",
        messages=PROMPT,
    )
    await parsed(raw)
    assert raw.headers["X-Tokens-Charged"] == "260"
    assert await sdks.available() == before - 260
    _, reservation = await sdks.reservation(raw.headers["X-Reservation-Id"])
    assert (reservation["amount"], reservation["charged"]) == (HOLD, 260)


async def test_a_charge_over_what_is_left_stops_at_zero(sdks: SDKs) -> None:
    await sdks.gateway.ledger.create_org("tight", "starter")
    await sdks.gateway.ledger.grant("tight", "general", 250, reason="exactly 250")
    sdks.vendors.openai_usage = OpenAIUsage(20_000, 0, 2_000)  # 260, 10 more than it has
    raw = await sdks.openai("tight").chat.completions.with_raw_response.create(
        model="big-model",
        messages=PROMPT,
    )
    await parsed(raw)
    assert raw.headers["X-Tokens-Charged"] == "250"  # all it had, never below zero
    assert await sdks.available("tight") == 0
    _, reservation = await sdks.reservation(raw.headers["X-Reservation-Id"], org="tight")
    assert (reservation["amount"], reservation["charged"]) == (HOLD, 250)
    commit = (await sdks.gateway.ledger.journal("tight", limit=1))[0]
    assert commit["kind"] == "commit" and commit["unbilled"] == 10


async def test_openai_stream_is_charged_exactly_and_asks_for_the_usage(sdks: SDKs) -> None:
    sdks.vendors.openai_usage = OpenAIUsage(10_000, 6_000, 1_501)  # 24, as above
    before = await sdks.available()
    raw = await sdks.openai().chat.completions.with_raw_response.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
    )
    assert raw.headers["X-Tokens-Held"] == str(HOLD)
    assert "X-Tokens-Charged" not in raw.headers
    rid = raw.headers["X-Reservation-Id"]
    stream = await parsed(raw)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    # The client did not ask for the usage chunk; the gateway did, and relays it.
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 10_000
    seen = only(sdks.vendors)
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["messages"] == PROMPT and seen.body["model"] == "small-model"
    await sdks.gateway.settled()
    assert await sdks.available() == before - 24
    status, reservation = await sdks.reservation(rid)
    assert status == 200, reservation
    assert reservation["state"] == "committed"
    assert (reservation["amount"], reservation["charged"]) == (HOLD, 24)
    assert reservation["usage"] == {
        "input": 4_000,
        "cached_input": 6_000,
        "output": 1_501,
        "model": "small-model",
    }


async def test_openai_stream_bytes_are_relayed_unchanged_then_the_charge(sdks: SDKs) -> None:
    sdks.vendors.openai_usage = OpenAIUsage(1_000, 0, 500)  # 2,000 + 3,000 -> 5
    options: ChatCompletionStreamOptionsParam = {"include_usage": True}
    async with sdks.openai().chat.completions.with_streaming_response.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
        stream_options=options,
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        relayed = await response.read()
    seen = only(sdks.vendors)
    assert seen.complete
    assert seen.body["stream_options"] == options  # the client's own, kept as sent
    assert relayed == bytes(seen.sent) + b": tokens-charged=5\n\n"


async def test_a_slow_stream_is_relayed_as_it_arrives_and_charged_at_its_end(
    sdks: SDKs,
) -> None:
    sdks.vendors.openai_usage = OpenAIUsage(1_000, 0, 500)  # 5
    before = await sdks.available()
    stream = await sdks.openai().chat.completions.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
        extra_headers={BEHAVIOUR: "slow", DELAY: "0.25"},
    )
    started = time.monotonic()
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    assert not sdks.vendors.seen[0].complete  # the vendor is still writing
    rest = [chunk async for chunk in stream]
    assert time.monotonic() - started > 1.0  # ten more events, a quarter second apart
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 500
    await sdks.gateway.settled()
    assert await sdks.available() == before - 5


async def test_an_openai_stream_cut_before_its_usage_is_refunded(sdks: SDKs) -> None:
    before = await sdks.available()
    stream = await sdks.openai().chat.completions.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
        extra_headers={BEHAVIOUR: "cut"},
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert received and not sdks.vendors.seen[0].complete
    await sdks.gateway.settled()
    assert await sdks.available() == before
    assert (await sdks.gateway.journal_kinds("acme"))[-2:] == ["reserve", "refund"]


async def test_an_openai_json_answer_cut_midway_is_refunded(sdks: SDKs) -> None:
    before = await sdks.available()
    with pytest.raises(openai.APIError):
        await sdks.openai().chat.completions.create(
            model="small-model",
            messages=PROMPT,
            extra_headers={BEHAVIOUR: "cut"},
        )
    await sdks.gateway.settled()
    assert await sdks.available() == before
    assert (await sdks.gateway.journal_kinds("acme"))[-2:] == ["reserve", "refund"]


async def test_a_client_that_hangs_up_mid_stream_pays_what_the_vendor_reports(
    sdks: SDKs,
) -> None:
    # The gateway reads the vendor's answer to its end and settles by it.
    sdks.vendors.openai_usage = OpenAIUsage(1_000, 0, 500)  # 5
    before = await sdks.available()
    stream = await sdks.openai().chat.completions.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
        extra_headers={BEHAVIOUR: "slow", DELAY: "0.1"},
    )
    await stream.__anext__()
    await stream.close()
    await sdks.gateway.settled()
    assert sdks.vendors.seen[0].complete
    assert await sdks.available() == before - 5


async def test_a_json_answer_too_large_to_meter_is_relayed_unchanged(sdks: SDKs) -> None:
    client = openai.AsyncOpenAI(
        base_url=sdks.gateway.url("/big-answers/v1"),
        api_key=token("acme", "alice"),
        max_retries=0,
        timeout=20,
    )
    sdks.clients.append(client)
    async with client.chat.completions.with_streaming_response.create(
        model="small-model",
        messages=PROMPT,
        extra_headers={BEHAVIOUR: "chunked"},  # no Content-Length, over 100 bytes
    ) as response:
        relayed = await response.read()
    seen = only(sdks.vendors)
    assert seen.complete and len(seen.sent) > 100
    assert relayed == bytes(seen.sent)
    assert json.loads(relayed)["choices"][0]["message"]["content"] == ANSWER


async def test_openai_answer_without_usage_is_charged_the_hold(sdks: SDKs) -> None:
    before = await sdks.available()
    raw = await sdks.openai().chat.completions.with_raw_response.create(
        model="small-model",
        messages=PROMPT,
        extra_headers={BEHAVIOUR: "no-usage"},
    )
    completion = await parsed(raw)
    assert completion.usage is None
    assert raw.headers["X-Tokens-Charged"] == str(HOLD)  # on_missing_usage: hold
    assert await sdks.available() == before - HOLD


# -- Anthropic ---------------------------------------------------------------------------


async def test_anthropic_json_is_charged_exactly_with_cache_reads(sdks: SDKs) -> None:
    # Uncached input = 2,000 + 1,000 cache writes; at 3, 0.3 and 15 per 1,000:
    # 9,000 + 3,000 + 10,500 = 22,500 -> 23 (20 if cache writes were ignored; 50 if cache
    # reads paid the input rate).
    sdks.vendors.anthropic_usage = AnthropicUsage(
        input_tokens=2_000,
        cache_creation_input_tokens=1_000,
        cache_read_input_tokens=10_000,
        output_tokens=700,
    )
    before = await sdks.available()
    raw = await sdks.anthropic().messages.with_raw_response.create(
        model="claude-test",
        max_tokens=1_024,
        messages=PROMPT,
    )
    message = await parsed(raw)
    assert message.content[0].text == ANSWER
    assert message.usage.cache_read_input_tokens == 10_000
    assert raw.headers["X-Tokens-Charged"] == "23"
    assert await sdks.available() == before - 23
    status, reservation = await sdks.reservation(raw.headers["X-Reservation-Id"])
    assert status == 200, reservation
    assert reservation["state"] == "committed"
    assert (reservation["amount"], reservation["charged"]) == (ANTHROPIC_HOLD, 23)
    assert reservation["usage"] == {
        "input": 3_000,
        "cached_input": 10_000,
        "output": 700,
        "model": "claude-test",
    }


async def test_anthropic_stream_is_charged_by_the_last_message_delta(sdks: SDKs) -> None:
    # message_start says output 1, a first message_delta 300, the last 600 (cumulative):
    # 9,000 + 3,000 + 9,000 = 21,000 -> exactly 21 (22 if any earlier count were added).
    sdks.vendors.anthropic_usage = AnthropicUsage(2_000, 1_000, 10_000, 600)
    before = await sdks.available()
    async with sdks.anthropic().messages.stream(
        model="claude-test",
        max_tokens=1_024,
        messages=PROMPT,
        extra_headers={BEHAVIOUR: "multi-delta"},
    ) as events:
        headers = events.response.headers
        final = await events.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == ANSWER
    assert final.usage.output_tokens == 600
    assert headers["X-Tokens-Held"] == str(ANTHROPIC_HOLD)
    assert "X-Tokens-Charged" not in headers
    seen = only(sdks.vendors)
    assert seen.complete and seen.body["stream"] is True
    assert "stream_options" not in seen.body  # an OpenAI option, not added here
    assert bytes(seen.sent).count(b"event: message_delta\n") == 2
    await sdks.gateway.settled()
    assert await sdks.available() == before - 21
    status, reservation = await sdks.reservation(headers["X-Reservation-Id"])
    assert status == 200, reservation
    assert reservation["state"] == "committed"
    assert (reservation["amount"], reservation["charged"]) == (ANTHROPIC_HOLD, 21)
    assert reservation["usage"] == {
        "input": 3_000,
        "cached_input": 10_000,
        "output": 600,
        "model": "claude-test",
    }


async def test_anthropic_stream_bytes_are_relayed_unchanged_then_the_charge(
    sdks: SDKs,
) -> None:
    sdks.vendors.anthropic_usage = AnthropicUsage(1_000, 0, 0, 200)  # 3,000 + 3,000 -> 6
    async with sdks.anthropic().messages.with_streaming_response.create(
        model="claude-test",
        max_tokens=1_024,
        messages=PROMPT,
        stream=True,
    ) as response:
        relayed = await response.read()
    seen = only(sdks.vendors)
    assert relayed == bytes(seen.sent) + b": tokens-charged=6\n\n"


async def test_an_anthropic_stream_cut_after_message_start_is_refunded(sdks: SDKs) -> None:
    before = await sdks.available()
    try:
        async with sdks.anthropic().messages.stream(
            model="claude-test",
            max_tokens=1_024,
            messages=PROMPT,
            extra_headers={BEHAVIOUR: "cut"},
        ) as events:
            await events.get_final_message()
    except Exception as exc:  # some SDK versions let their HTTP library's error through
        assert isinstance(exc, anthropic.APIConnectionError) or "incomplete" in str(exc)
    else:
        pytest.fail("the cut stream reached the client as a complete one")
    assert b"event: message_start\n" in only(sdks.vendors).sent  # its input was reported
    await sdks.gateway.settled()
    assert await sdks.available() == before
    assert (await sdks.gateway.journal_kinds("acme"))[-2:] == ["reserve", "refund"]


async def test_anthropic_answer_without_usage_is_refunded(sdks: SDKs) -> None:
    before = await sdks.available()
    raw = await sdks.anthropic().messages.with_raw_response.create(
        model="claude-test",
        max_tokens=1_024,
        messages=PROMPT,
        extra_headers={BEHAVIOUR: "no-usage"},
    )
    await parsed(raw)
    assert raw.headers["X-Tokens-Charged"] == "0"  # on_missing_usage: refund
    assert await sdks.available() == before


# -- credentials and who pays ------------------------------------------------------------


async def test_the_jwt_never_reaches_the_vendors_and_their_keys_always_do(sdks: SDKs) -> None:
    jwt = token("acme", "alice")
    oa = sdks.openai()
    # A client that sends its own x-api-key (as older Anthropic SDKs do with api_key).
    an = sdks.anthropic(**{"x-api-key": "client-chosen-key"})
    await oa.chat.completions.create(model="m", messages=PROMPT)
    async for _ in await oa.chat.completions.create(
        model="m",
        messages=PROMPT,
        stream=True,
    ):
        pass
    await an.messages.create(model="c", max_tokens=64, messages=PROMPT)
    async with an.messages.stream(model="c", max_tokens=64, messages=PROMPT) as events:
        await events.get_final_message()
    await sdks.gateway.settled()
    assert [(s.path, s.status) for s in sdks.vendors.seen] == [
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 200),
        ("/v1/messages", 200),
        ("/v1/messages", 200),
    ]
    for seen in sdks.vendors.seen:
        for name, value in seen.headers.items():
            assert jwt not in value and DUMMY_KEY not in value, name
            assert "client-chosen-key" not in value, name
        if seen.path == "/v1/chat/completions":
            assert seen.headers.getall("Authorization") == [f"Bearer {OPENAI_KEY}"]
        else:
            assert seen.headers.getall("x-api-key") == [ANTHROPIC_KEY]
            assert "Authorization" not in seen.headers
        assert jwt not in json.dumps(seen.body)


async def test_the_caller_pays_nobody_else_and_gateway_audit_is_clean(
    sdks: SDKs,
    rules_text: str,
    database_url: str,
    redis_url: str,
    schema: str,
    tmp_path: Path,
) -> None:
    sdks.vendors.openai_usage = OpenAIUsage(10_000, 6_000, 1_501)  # 24
    sdks.vendors.anthropic_usage = AnthropicUsage(2_000, 1_000, 10_000, 700)  # 23
    acme, bigco = await sdks.available("acme"), await sdks.available("bigco")
    bigco_journal = await sdks.gateway.journal_kinds("bigco")
    oa = sdks.openai("acme", "alice")
    await oa.chat.completions.create(model="small-model", messages=PROMPT)
    async for _ in await oa.chat.completions.create(
        model="small-model",
        messages=PROMPT,
        stream=True,
    ):
        pass
    an = sdks.anthropic("acme", "bob")
    await an.messages.create(model="claude-test", max_tokens=64, messages=PROMPT)
    await sdks.gateway.settled()
    assert await sdks.available("acme") == acme - 24 - 24 - 23
    assert await sdks.available("bigco") == bigco
    assert await sdks.gateway.journal_kinds("bigco") == bigco_journal
    # Another organization cannot read acme's reservation.
    raw = await oa.chat.completions.with_raw_response.create(
        model="small-model",
        messages=PROMPT,
    )
    await parsed(raw)
    status, _ = await sdks.reservation(raw.headers["X-Reservation-Id"], org="bigco")
    assert status == 404

    assert await sdks.gateway.ledger.audit() == []
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "audit",
        env=process_env(database_url, redis_url, schema, rules_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert "every invariant holds" in out.decode()

"""The one seam to redis-py: the client, the Lua scripts, and the translation of every
driver error into ``LimiterUnavailable``.

Scripts are loaded by SHA: a server that does not know one is given it and the call is
made again, so a restarted Redis needs no restarted gateway.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.errors import LimiterUnavailable

log = logging.getLogger("gateway.limits")

# What redis-py raises when the store cannot answer: connection and timeout errors, a
# cluster that is down or moving (CLUSTERDOWN, TRYAGAIN, MOVED/ASK it could not follow),
# a slot that no node serves yet.
STORE_ERRORS = (RedisError, RedisClusterException, OSError)

SCRIPTS = ("admit", "settle_tokens", "blocked", "refusals", "spike")

Client = aioredis.Redis

# Short timeouts: the limits are on every request's path, and an unreachable store is
# answered by limits.on_store_error rather than waited for.
TIMEOUTS: dict[str, Any] = {
    "socket_timeout": 0.5,
    "socket_connect_timeout": 0.5,
    "decode_responses": True,
}


class Script(NamedTuple):
    text: str
    sha: str


class Eval(NamedTuple):
    """A call of one of ``SCRIPTS``."""

    script: str
    keys: Sequence[str]
    args: Sequence[Any]


# A script call, or a plain command such as ("ZREM", key, member).
Call = Eval | tuple[Any, ...]


def connect(url: str) -> Client:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``). Connects lazily:
    nothing is sent before the first command."""
    return aioredis.Redis.from_url(url, health_check_interval=10, **TIMEOUTS)


class Store:
    """Runs the limits' scripts and commands; every failure to answer is a
    ``LimiterUnavailable``. The outage is logged once when it starts and once when it ends,
    and ``errors`` counts the failures (for metrics)."""

    def __init__(self, client: Client, *, policy: str = "open") -> None:
        self.client = client
        self.errors = 0
        self.policy = policy  # named in the outage's log line only
        self._outage = False
        lua = resources.files("gateway.limits").joinpath("lua")
        texts = {name: lua.joinpath(f"{name}.lua").read_text() for name in SCRIPTS}
        self._scripts = {
            name: Script(text, hashlib.sha1(text.encode()).hexdigest())
            for name, text in texts.items()
        }

    async def close(self) -> None:
        await self.client.aclose()

    def down(self, exc: BaseException) -> LimiterUnavailable:
        """Count ``exc`` and log the outage if it starts; the error to raise."""
        self.errors += 1
        if not self._outage:
            self._outage = True
            log.error(
                "Redis unreachable (%s: %s); limits fail %s until it is back",
                type(exc).__name__,
                exc,
                self.policy,
            )
        return LimiterUnavailable(f"the limits store is unreachable: {exc}")

    def up(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("Redis reachable again; limits enforced")

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> list[int]:
        """One script call, one round trip. Raises ``LimiterUnavailable``."""
        sha = self._scripts[script].sha
        try:
            try:
                result = await self.client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self.client.script_load(self._scripts[script].text)
                result = await self.client.evalsha(sha, len(keys), *keys, *args)
        except STORE_ERRORS as exc:
            raise self.down(exc) from exc
        self.up()
        return [int(v) for v in result]

    async def delete(self, key: str) -> int:
        """Delete ``key``; 1 if it existed. Raises ``LimiterUnavailable``."""
        try:
            deleted = await self.client.delete(key)
        except STORE_ERRORS as exc:
            raise self.down(exc) from exc
        self.up()
        return int(deleted)

    async def ping(self) -> None:
        """Raises ``LimiterUnavailable`` unless the store answers."""
        try:
            await self.client.ping()
        except STORE_ERRORS as exc:
            raise self.down(exc) from exc
        self.up()

    async def pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` in one round trip (one per node involved, on a cluster). Returns
        each call's reply, or the exception that call met; raises ``LimiterUnavailable``
        when the pipeline could not be sent at all."""
        try:
            results = await self._send(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                for name in {c.script for c in calls if isinstance(c, Eval)}:
                    await self.client.script_load(self._scripts[name].text)
                again = await self._send([calls[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except STORE_ERRORS as exc:
            raise self.down(exc) from exc
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is None:
            self.up()
        else:
            self.down(failed)
        return results

    async def _send(self, calls: Sequence[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            if isinstance(call, Eval):
                sha = self._scripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
            else:
                pipe.execute_command(*call)
        return list(await pipe.execute(raise_on_error=False))

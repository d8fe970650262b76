"""The one seam to redis-py: a single Redis or a Redis Cluster, the Lua scripts, and the
translation of every driver error into ``LimiterUnavailable``.

A cluster is named by ``redis+cluster://[user:password@]host:port[,host:port...]`` (or
``rediss+cluster://`` for TLS): any reachable node will do, the client learns the others
and follows the slots as they move (a failover, a resharding). Every script touches the
keys of one organization, which share one hash tag and so one slot.

Scripts are loaded by SHA: a server that does not know one (a fresh node, a replica just
promoted) is given it and the call is made again, so a failover needs no restart. Whatever
a call to redis-py raises (``STORE_ERRORS``, or one of its own bugs) means no answer:
``LimiterUnavailable``, which ``limits.on_store_error`` answers, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.errors import ConfigError, LimiterUnavailable

log = logging.getLogger("gateway.limits")

# What redis-py raises when the store cannot answer: connection and timeout errors, a
# cluster that is down or moving (CLUSTERDOWN, TRYAGAIN, MOVED/ASK it could not follow),
# a slot that no node serves yet.
STORE_ERRORS = (RedisError, RedisClusterException, OSError)

SCRIPTS = ("admit", "lease", "settle_tokens", "blocked", "refusals", "spike")
WINDOWED = frozenset({"admit", "lease"})  # the scripts that read rate windows (window.lua)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
CLUSTER_RETRIES = 2

Client = aioredis.Redis | RedisCluster

# Short timeouts: the limits are on every request's path, and an unreachable store is
# answered by limits.on_store_error rather than waited for.
ANSWER_SECONDS = 0.5
TIMEOUTS: dict[str, Any] = {
    "socket_timeout": ANSWER_SECONDS,
    "socket_connect_timeout": ANSWER_SECONDS,
    "decode_responses": True,
}
# A single Redis has no socket timeout of its own: the store bounds each whole call
# instead (Store._answer), since redis-py puts every write under asyncio.wait_for, a task
# of its own per command (about 60 us of CPU an admit). A cluster keeps its socket
# timeouts: its client retries on other nodes within a call.
SINGLE_TIMEOUTS: dict[str, Any] = {**TIMEOUTS, "socket_timeout": None}


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


def _hide(url: str) -> str:
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


def connect(url: str) -> Client:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://`` or a cluster's
    ``redis+cluster://host:port[,host:port...]``. Raises ``ConfigError`` for a URL it
    cannot use. Connects lazily: nothing is sent before the first command."""
    scheme, sep, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return aioredis.Redis.from_url(url, health_check_interval=10, **SINGLE_TIMEOUTS)
    userinfo, _, hosts_path = rest.rpartition("@")
    hosts, _, path = hosts_path.partition("/")
    path, _, query = path.partition("?")
    if "?" in hosts:
        hosts, _, query = hosts.partition("?")
    errors = []
    nodes = []
    for host in hosts.split(","):
        parsed = urlsplit(f"//{host}")
        try:
            port = parsed.port or 6379
        except ValueError:
            port = 0
        if not parsed.hostname or not port or parsed.username is not None:
            errors.append(f"'{host}' is not a host:port")
            continue
        nodes.append((unquote(parsed.hostname), port))
    if path not in ("", "0"):
        errors.append(f"a cluster has only database 0, not '{path}'")
    if errors:
        raise ConfigError("REDIS_URL", [f"'{_hide(url)}': {e}" for e in errors])
    # The user, the password and the query (ssl_ca_certs=...) read as redis-py reads them.
    first = f"{nodes[0][0]}:{nodes[0][1]}" if ":" not in nodes[0][0] else f"[{nodes[0][0]}]"
    auth = f"{userinfo}@" if sep and userinfo else ""
    options: dict[str, Any] = dict(parse_url(f"{CLUSTER_SCHEMES[scheme]}://{auth}{first}?{query}"))
    for name in ("host", "port", "db"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        # Few retries, each after a fresh look at the cluster's layout: enough to follow a
        # failover that is over, not to hold a request while one is under way.
        retry=Retry(NoBackoff(), CLUSTER_RETRIES),
        **{**TIMEOUTS, **options},
    )


class Store:
    """Runs the limits' scripts and commands; every failure to answer is a
    ``LimiterUnavailable``. The outage is logged once when it starts and once when it ends,
    and ``errors`` counts the failures (for metrics)."""

    def __init__(self, client: Client, *, policy: str = "open") -> None:
        self.client = client
        self.errors = 0
        self.policy = policy  # named in the outage's log line only
        self._outage = False
        self._loading = asyncio.Lock()
        self._loads = 0  # how many times the scripts were loaded
        self._ready = not isinstance(client, RedisCluster)
        self._timeout = None if isinstance(client, RedisCluster) else ANSWER_SECONDS
        lua = resources.files("gateway.limits").joinpath("lua")
        window = lua.joinpath("window.lua").read_text()  # shared by the rates' scripts
        texts = {
            name: (window if name in WINDOWED else "") + lua.joinpath(f"{name}.lua").read_text()
            for name in SCRIPTS
        }
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

    @contextlib.asynccontextmanager
    async def _answer(self) -> AsyncIterator[None]:
        """Within: driver calls, bounded in time (a timeout is an OSError). Any error they
        raise is the store not answering."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except STORE_ERRORS as exc:
            raise self.down(exc) from exc
        except Exception as exc:
            # Not a store error but a bug of redis-py's (its cluster client has raised
            # AttributeError on connections it closed under a busy task): still no answer
            # from the store, so on_store_error decides, never a 500.
            log.exception("redis-py failed")
            raise self.down(exc) from exc

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> list[int]:
        """One script call, one round trip. Raises ``LimiterUnavailable``."""
        sha = self._scripts[script].sha
        async with self._answer():
            await self._prepare()
            loads = self._loads
            try:
                result = await self.client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._load(loads)
                result = await self.client.evalsha(sha, len(keys), *keys, *args)
        self.up()
        return [int(v) for v in result]

    async def delete(self, key: str) -> int:
        """Delete ``key``; 1 if it existed. Raises ``LimiterUnavailable``."""
        async with self._answer():
            await self._prepare()
            deleted = await self.client.delete(key)
        self.up()
        return int(deleted)

    async def ping(self) -> None:
        """Raises ``LimiterUnavailable`` unless the store answers."""
        async with self._answer():
            await self._prepare()
            await self.client.ping()
        self.up()

    async def pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` in one round trip (one per node involved, on a cluster). Returns
        each call's reply, or the exception that call met; raises ``LimiterUnavailable``
        when the pipeline could not be sent at all."""
        async with self._answer():
            await self._prepare()
            loads = self._loads
            results = await self._send(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                await self._load(loads)
                again = await self._send([calls[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is None:
            self.up()
        else:
            self.down(failed)
        return results

    async def _prepare(self) -> None:
        """Learn a cluster's layout before the first command, one task at a time: redis-py's
        cluster client, first used by many tasks at once, closes connections under some of
        them (which then fail with AttributeError)."""
        if self._ready:
            return
        async with self._loading:
            if not self._ready and isinstance(self.client, RedisCluster):
                await self.client.initialize()
            self._ready = True

    async def _load(self, seen: int) -> None:
        """Load every script, unless that was done since ``seen``. One task at a time: many
        requests meet a node without the scripts at once (a start, a failover)."""
        async with self._loading:
            if self._loads == seen:
                for script in self._scripts.values():
                    await self.client.script_load(script.text)
                self._loads += 1

    async def _send(self, calls: Sequence[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            if isinstance(call, Eval):
                sha = self._scripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
            else:
                pipe.execute_command(*call)
        return list(await pipe.execute(raise_on_error=False))

"""Streams: how many concurrent server-sent-event streams a target holds before the time
to first byte (TTFB) of a new stream passes a limit.

One step keeps ``streams`` streams open for a while: each of them is a client that opens a
stream (POST with ``"stream": true``), reads it to its end and opens the next. Their first
streams start spread over ``ramp`` seconds (about one stream's length), so that streams
start and end all the time rather than in waves; then for ``window`` seconds each new
stream's TTFB (request sent to first byte of body) is recorded. The clients run in a few
processes of their own, one event loop each, with aiohttp."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.load import percentile, split_connections, tally

TTFB_LIMIT_MS = 50.0
DEFAULT_STEPS = (25, 50, 100, 200, 400, 800)
DONE = b"data: [DONE]"


@dataclass
class StreamStep:
    """What the clients saw at one step of the ladder."""

    target: str
    streams: int  # concurrent streams kept open
    measured: int  # streams started within the window
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    non_2xx: int
    incomplete: int  # 2xx streams that ended without [DONE]
    errors: dict[str, int]
    cpu: dict[str, float] = field(default_factory=dict)

    def holds(self, limit_ms: float = TTFB_LIMIT_MS) -> bool:
        """Every measured stream whole and 2xx, and TTFB p99 within ``limit_ms``."""
        return (
            self.measured > 0
            and not (self.non_2xx or self.incomplete or self.errors)
            and self.ttfb_p99_ms <= limit_ms
        )

    def why_not(self, limit_ms: float = TTFB_LIMIT_MS) -> str:
        """Why the step does not hold ('' when it does)."""
        reasons = []
        if self.measured == 0:
            reasons.append("no stream started within the window")
        if self.ttfb_p99_ms > limit_ms:
            reasons.append(f"TTFB p99 {self.ttfb_p99_ms:.1f} ms > {limit_ms:.0f} ms")
        if self.non_2xx:
            reasons.append(f"{self.non_2xx} non-2xx")
        if self.incomplete:
            reasons.append(f"{self.incomplete} incomplete")
        if self.errors:
            reasons.append("errors " + ", ".join(f"{k} {v}" for k, v in self.errors.items()))
        return "; ".join(reasons)


def held(steps: Sequence[StreamStep], limit_ms: float = TTFB_LIMIT_MS) -> int:
    """The most concurrent streams held: the largest held step below every step that
    missed (0 when the first already misses). For a ladder as ``ladder`` runs it (up to
    the first miss, then halving the gap between the last held and the least missed) that
    is the last held step of the climb, or of the halving."""
    least_missed = min((s.streams for s in steps if not s.holds(limit_ms)), default=None)
    return max(
        (
            s.streams
            for s in steps
            if s.holds(limit_ms) and (least_missed is None or s.streams < least_missed)
        ),
        default=0,
    )


def _climb(steps: Sequence[int], refine: int, done: list[StreamStep]) -> Iterator[int]:
    """The step sizes of a ladder, one at a time: the caller runs each and appends its
    ``StreamStep`` to ``done`` before asking for the next (see ``ladder``)."""
    for n in steps:
        yield n
        if not done[-1].holds():
            break
    else:
        return  # every step held: nothing to refine
    most, least = held(done), done[-1].streams
    for _ in range(refine):
        middle = (most + least) // 2
        if not most < middle < least:
            break
        yield middle
        if done[-1].holds():
            most = middle
        else:
            least = middle


def ladder(
    steps: Sequence[int],
    refine: int,
    run: Callable[[int], StreamStep],
    done: list[StreamStep] | None = None,
) -> list[StreamStep]:
    """Run ``run(streams)`` at each of ``steps`` until one misses, then ``refine`` times
    at the middle of the gap between the most held and the least missed (rounded down;
    none once the gap is closed): each halving doubles the resolution of what a ladder
    of doublings can tell (100 held and 200 missed says "100 to 199"; three halvings say
    within 12). The steps run, in order, appended to ``done`` as they end (so that a run
    cut short keeps them)."""
    done = [] if done is None else done
    for n in _climb(steps, refine, done):
        done.append(run(n))
    return done


def ladders(
    steps: Sequence[int],
    refine: int,
    runs: Mapping[str, Callable[[int], StreamStep]],
    done: Mapping[str, list[StreamStep]],
) -> None:
    """Several ladders (as ``ladder`` runs each) side by side: each round runs the next
    step of every ladder still climbing, their order turned round every round, so that
    the targets compared meet the machine as it is in the same minutes. (Run one after
    the other, the second met a machine that had moved: the pass-through alone varied by
    30% between runs.) Each ladder's steps are appended to ``done[label]`` as they end."""
    climbs = {label: _climb(steps, refine, done[label]) for label in runs}
    turn = 0
    while climbs:
        labels = list(climbs) if turn % 2 == 0 else list(reversed(climbs))
        turn += 1
        for label in labels:
            n = next(climbs[label], None)
            if n is None:
                del climbs[label]
            else:
                done[label].append(runs[label](n))


def ladder_steps(text: str) -> tuple[int, ...]:
    """``25,50,100`` as increasing positive step sizes. Raises ``ValueError``."""
    steps = tuple(int(part) for part in text.split(",") if part.strip())
    if not steps or any(s <= 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"must be increasing positive numbers separated by commas, got {text!r}")
    return steps


def stagger(streams: int, processes: int, ramp: float) -> list[list[float]]:
    """Each process's streams' start offsets: stream i of all starts at ``ramp * i /
    streams``, dealt out to the processes in turn so that each spreads over the whole
    ramp."""
    shares = split_connections(streams, processes)
    offsets: list[list[float]] = [[] for _ in shares]
    for i in range(streams):
        offsets[i % len(shares)].append(ramp * i / streams)
    return offsets


async def _stream_clients(
    url: str,
    headers: dict[str, str],
    body: bytes,
    offsets: list[float],
    ramp: float,
    window: float,
    barrier: Any,
) -> dict[str, Any]:
    import aiohttp

    ttfbs: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    incomplete = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.to_thread(barrier.wait)  # every process starts at once
        started = time.monotonic()
        measure_from, measure_until = started + ramp, started + ramp + window

        async def client(offset: float) -> None:
            nonlocal incomplete
            await asyncio.sleep(offset)
            while (began := time.monotonic()) < measure_until:
                counted = began >= measure_from
                clock = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        first = await resp.content.readany()
                        ttfb = time.perf_counter() - clock
                        tail = first[-64:]
                        async for data in resp.content.iter_any():
                            tail = (tail + data)[-64:]
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if counted:
                        errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                if counted:
                    ttfbs.append(ttfb)
                    statuses[status] += 1
                    if 200 <= status < 300 and DONE not in tail:
                        incomplete += 1

        await asyncio.gather(*(client(offset) for offset in offsets))
    return {
        "ttfbs": ttfbs,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "incomplete": incomplete,
    }


def _stream_process(
    url: str,
    headers: dict[str, str],
    body: bytes,
    offsets: list[float],
    ramp: float,
    window: float,
    barrier: Any,
    results: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        results.put(
            asyncio.run(_stream_clients(url, headers, body, offsets, ramp, window, barrier))
        )
    except BaseException as exc:
        barrier.abort()
        results.put({"failed": f"{type(exc).__name__}: {exc}"})


def combine_streams(target: str, streams: int, outcomes: Sequence[dict[str, Any]]) -> StreamStep:
    """One ``StreamStep`` from the processes' outcomes (TTFBs in seconds, statuses, errors,
    incomplete streams). Raises ``BenchError`` if any process failed."""
    statuses, errors = tally(outcomes, "the stream clients")
    ttfbs = sorted(x for o in outcomes for x in o["ttfbs"])
    ok = sum(n for status, n in statuses.items() if 200 <= int(status) < 300)
    return StreamStep(
        target=target,
        streams=streams,
        measured=len(ttfbs),
        ttfb_p50_ms=percentile(ttfbs, 50) * 1e3,
        ttfb_p99_ms=percentile(ttfbs, 99) * 1e3,
        non_2xx=len(ttfbs) - ok,
        incomplete=sum(int(o["incomplete"]) for o in outcomes),
        errors=dict(errors),
    )


def run_streams(
    target: str,
    url: str,
    token: str,
    body: str,
    *,
    streams: int,
    processes: int,
    ramp: float,
    window: float,
) -> StreamStep:
    """Keep ``streams`` streams open against ``url`` (see the module's docstring)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    offsets = stagger(streams, processes, ramp)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(offsets))
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_stream_process,
            args=(url, headers, body.encode(), share, ramp, window, barrier, results),
            daemon=True,
        )
        for share in offsets
    ]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=ramp + window + 120) for _ in workers]
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
                w.join()
    return combine_streams(target, streams, outcomes)

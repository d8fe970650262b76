"""``--profile FILE``: py-spy samples the gateway during its 32-connection measurement, and
the samples are summed up by area (Redis client, asyncpg, JSON, JWT, aiohttp server and
client, our code, ...) and by function.

py-spy's raw output (``--format raw``) is one line per distinct stack, ``frame;frame;...
count``, outermost frame first, each frame ``function (file:line)``. A sample counts
towards the area of the innermost frame that belongs to one: a frame in the standard
library or in asyncio is charged to the code that called it (``hmac`` under ``jwt`` is JWT,
``asyncio.streams`` under ``redis`` is the Redis client), and a sample with no such frame
is the event loop's. The frames from the program's start down to the event loop's
(``asyncio.Runner.run``, ``uvloop``, ``base_events``) are dropped first: everything runs
under them. uvloop is C, so a sample whose innermost Python frame is the loop itself is
uvloop's own work (sockets, transports, timers)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

# (area, a pattern on the frame's file), first match wins; checked innermost frame first.
# aiohttp's writer, parser and streams serve both sides: such a frame is charged to the
# side of the nearest client or server frame outside it.
AIOHTTP_SHARED = "aiohttp (writer, parser, streams)"
# py-spy names files from their package directory (``aiohttp/web_protocol.py``).
AREAS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (area, re.compile(rf"(^|/)({pattern})"))
    for area, pattern in (
        ("Redis client", r"redis/"),
        ("asyncpg", r"asyncpg/"),
        ("JWT", r"jwt/|cryptography/"),
        ("JSON", r"json/|orjson|ujson"),
        ("pydantic", r"pydantic(_core)?/"),
        ("aiohttp client", r"aiohttp/(client|connector)"),
        ("aiohttp server", r"aiohttp/web"),
        (AIOHTTP_SHARED, r"aiohttp/"),
        ("yarl/multidict", r"yarl/|multidict/"),
        ("prometheus", r"prometheus_client/"),
        ("logging", r"logging/"),
        ("our code", r"gateway/"),
    )
)
LOOP = re.compile(r"(^|/)(asyncio/runners\.py|asyncio/base_events\.py|uvloop/)")
EVENT_LOOP = "event loop (uvloop, asyncio), other"
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def label(self) -> str:
        short = re.sub(r"^.*/(site-packages|lib/python[\d.]+)/", "", self.file)
        return f"{self.function} ({short})"


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "")
    return Frame(match["function"], match["file"])


def parse_raw(text: str) -> Counter[tuple[Frame, ...]]:
    """Samples per stack (outermost frame first) from py-spy's ``--format raw``."""
    stacks: Counter[tuple[Frame, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(parse_frame(f) for f in stack.split(";"))] += int(count)
    return stacks


def area_of(frame: Frame) -> str | None:
    for area, pattern in AREAS:
        if pattern.search(frame.file):
            return area
    return None


def under_loop(stack: tuple[Frame, ...]) -> tuple[Frame, ...]:
    """The frames inside the event loop's innermost frame (all of them when it has none)."""
    for i in range(len(stack) - 1, -1, -1):
        if LOOP.search(stack[i].file):
            return stack[i + 1 :]
    return stack


def by_area(stacks: Mapping[tuple[Frame, ...], int]) -> Counter[str]:
    """Samples per area: that of the innermost frame under the loop belonging to one, else
    the loop's."""
    areas: Counter[str] = Counter()
    for stack, n in stacks.items():
        inner = [a for f in reversed(under_loop(stack)) if (a := area_of(f)) is not None]
        area = inner[0] if inner else EVENT_LOOP
        if area == AIOHTTP_SHARED:
            sides = ("aiohttp client", "aiohttp server")
            area = next((a for a in inner if a in sides), area)
        areas[area] += n
    return areas


def by_function(stacks: Mapping[tuple[Frame, ...], int], *, inclusive: bool) -> Counter[str]:
    """Samples per function: in its own code (self), or with what it called (inclusive,
    each function counted once per sample)."""
    functions: Counter[str] = Counter()
    for stack, n in stacks.items():
        if not stack:
            continue
        if inclusive:
            for label in {f.label for f in under_loop(stack)}:
                functions[label] += n
        else:
            functions[stack[-1].label] += n
    return functions


def percent_lines(counts: Counter[str], total: int, limit: int) -> list[str]:
    return [f"  {100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(limit)]


def summary_lines(stacks: Mapping[tuple[Frame, ...], int], limit: int = 15) -> list[str]:
    total = sum(stacks.values())
    if not total:
        return ["profile: no samples"]
    return [
        f"profile of the gateway: {total} samples of a busy process (py-spy)",
        "by area (each sample charged to the innermost library or our code on its stack):",
        *percent_lines(by_area(stacks), total, limit),
        "by function, self:",
        *percent_lines(by_function(stacks, inclusive=False), total, limit),
        "by function, inclusive (ours):",
        *percent_lines(
            Counter(
                {
                    k: v
                    for k, v in by_function(stacks, inclusive=True).items()
                    if re.search(r"\((.*/)?gateway/", k)
                }
            ),
            total,
            limit,
        ),
    ]


def find_py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise BenchError("--profile: py-spy is not installed (.venv/bin/pip install py-spy)")
    return found


def start_py_spy(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` and its worker processes for ``seconds`` into ``output``."""
    argv = [
        find_py_spy(),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--output",
        str(output),
        "--nonblocking",  # sampling must not stop the gateway it measures
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

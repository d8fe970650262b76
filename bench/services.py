"""The servers a run starts and stops: the sample upstream, the pass-through and the gateway
as subprocesses, the gateway's own commands, and the PostgreSQL the ledger lives in (a
fresh schema on DATABASE_URL, or the embedded server the gateway starts)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from bench.errors import BenchError

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent  # .venv/bin: the gateway command lives next to python


class Service:
    """A server subprocess with its output in a log file; stopped with SIGTERM, then
    SIGKILL. It runs in its own session so that Ctrl-C reaches only this script, which
    stops the servers in order (the gateway first, so it settles what is in flight)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {self.name} did not stop within {timeout:.0f}s: killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"    | {line}" for line in self.log_lines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, service: Service, timeout: float) -> None:
    """Wait until ``url`` answers (any status below 500). Raises ``BenchError`` if the
    service exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if not service.alive():
            raise BenchError(f"{service.name} exited while starting:\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{service.name} did not answer {url} within {timeout:.0f}s:\n{service.tail()}"
            )
        time.sleep(0.2)


class GatewayCommand:
    """How to run the ``gateway`` command with this run's rules and environment."""

    def __init__(self, rules: Path, env: dict[str, str]) -> None:
        self.rules = rules
        self.env = env
        self.exe = str(BIN / "gateway")

    def argv(self, *args: str) -> list[str]:
        return [self.exe, "--rules", str(self.rules), *args]

    def run(self, *args: str) -> str:
        """The command's standard output. Raises ``BenchError`` if it exits non-zero."""
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(
                f"`gateway {' '.join(args)}` exited {proc.returncode}:\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout


def forwarded_by_gateway(upstream_url: str) -> dict[str, int]:
    """The bench upstream's count of the requests the gateway sent it, by path
    (``bench/upstream.py``). Raises ``BenchError`` when it does not answer."""
    import json

    try:
        with urllib.request.urlopen(f"{upstream_url}/_bench/forwarded", timeout=10) as resp:
            counts = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchError(f"the bench upstream did not give its counts: {exc}") from exc
    return {str(path): int(n) for path, n in counts["gateway"].items()}


def counted_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before``, path by path, the paths with none left out."""
    return {p: n - before.get(p, 0) for p, n in after.items() if n - before.get(p, 0)}


# -- PostgreSQL --------------------------------------------------------------------------


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_schema(dsn: str, schema: str) -> None:
    """Isolation, not ledger: the gateway migrates the ledger into this empty schema.
    ``schema`` is generated by the run (``bench_<hex>``), never taken from input."""
    import asyncio

    asyncio.run(_execute(dsn, f'CREATE SCHEMA "{schema}"'))


def drop_schema(dsn: str, schema: str) -> None:
    import asyncio

    asyncio.run(_execute(dsn, f'DROP SCHEMA "{schema}" CASCADE'))


def parse_postmaster_pid(text: str) -> str | None:
    """The DSN of a PostgreSQL server from its postmaster.pid (pid, data dir, start time,
    port, socket dir, listen address, ...): its socket when it has one, else its address.
    None when the file is incomplete (the server is still starting)."""
    lines = text.splitlines()
    if len(lines) < 5:
        return None
    port, socket_dir = lines[3].strip(), lines[4].strip()
    if socket_dir:
        return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    host = lines[5].strip() if len(lines) > 5 and lines[5].strip() not in ("", "*") else "127.0.0.1"
    return f"postgresql://postgres@{host}:{port}/postgres"


def embedded_dsn(data_dir: Path) -> str | None:
    """The DSN of the embedded PostgreSQL the gateway started in ``data_dir``."""
    try:
        return parse_postmaster_pid((data_dir / "postgres" / "postmaster.pid").read_text())
    except OSError:
        return None


def stop_leftovers(data_dir: Path) -> None:
    """The gateway stops the embedded servers it started when it exits; should one survive
    (the gateway was killed), stop the processes that use this run's data directory, which
    no one else can be using."""
    marker = str(data_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            print(f"  stopping leftover process {entry.name}: {cmdline[:120]}")
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGINT)  # PostgreSQL: fast shutdown

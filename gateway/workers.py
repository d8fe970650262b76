"""``gateway serve --workers N``: N processes sharing one port through SO_REUSEPORT.

The parent starts the embedded stores once (when no URLs are set) so every worker uses the
same ones, gives the workers one Prometheus multiprocess directory, passes SIGHUP (reload)
and SIGTERM/SIGINT (graceful stop) on to them, and restarts a worker that dies.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from gateway.embedded import start_postgres, start_valkey
from gateway.settings import SUPERVISOR_PID, Settings

log = logging.getLogger("gateway.workers")


# A worker that exits this soon after its start is failing, not crashing: stop, not loop.
CRASH_LOOP_SECONDS = 10.0


def supervise(settings: Settings, rules_path: Path, host: str, port: int, workers: int) -> int:
    env = dict(os.environ)
    stop_valkey = None
    if settings.database_url is None:
        env["DATABASE_URL"] = start_postgres(settings.data_dir)
    if settings.redis_url is None:
        env["REDIS_URL"], stop_valkey = start_valkey(settings.data_dir)
    try:
        return _supervise(env, settings, rules_path, host, port, workers)
    finally:
        if stop_valkey is not None:
            stop_valkey()


def _supervise(
    env: dict[str, str], settings: Settings, rules_path: Path, host: str, port: int, workers: int
) -> int:
    metrics_dir = settings.data_dir.resolve() / f"metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    env[SUPERVISOR_PID] = str(os.getpid())
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "--rules",
        str(rules_path),
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--reuse-port",
    ]
    stopping = False
    started: dict[int, float] = {}

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(command, env=env)
        started[child.pid] = time.monotonic()
        return child

    children = [start() for _ in range(workers)]
    failed = 0
    log.info("started %d workers on %s:%d: pids %s", workers, host, port, [c.pid for c in children])

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        while True:
            alive = [c for c in children if c.poll() is None]
            if stopping and not alive:
                break
            for i, child in enumerate(children):
                if stopping or child.poll() is None:
                    continue
                if time.monotonic() - started[child.pid] < CRASH_LOOP_SECONDS:
                    log.error(
                        "worker %d failed at start (exit %s); stopping", child.pid, child.returncode
                    )
                    failed = child.returncode or 1
                    forward(signal.SIGTERM, None)
                    break
                log.error("worker %d exited with %s; restarting it", child.pid, child.returncode)
                children[i] = start()
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return failed

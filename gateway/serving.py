"""``gateway serve``: one serving process, or a supervisor of ``--workers`` of them.

The connection timeouts come from the command's options, else from the environment
(``GATEWAY_HEADER_TIMEOUT``, ``GATEWAY_KEEPALIVE_TIMEOUT``). Workers are started with the
supervisor's environment and not its options, so the options reach them through it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from gateway.app import build_app, reload_rules
from gateway.rules import Rules
from gateway.runtime import (
    check_serving,
    die_with_parent,
    listening,
    open_ledger,
    open_limiter,
    run_async,
    supervisor_pid,
    tune_gc,
    wait_for_signal,
)
from gateway.settings import Settings, parse_seconds
from gateway.workers import supervise

log = logging.getLogger("gateway.serving")


def seconds(text: str) -> float:
    """The type of ``--header-timeout`` and ``--keepalive-timeout``."""
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_timeout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--header-timeout",
        type=seconds,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete this long after it "
        "opened, or after the request's first byte on a kept-alive connection; bytes "
        "trickling in do not extend it (default: $GATEWAY_HEADER_TIMEOUT or 10)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=seconds,
        metavar="SECONDS",
        help="close a kept-alive connection idle this long between requests "
        "(default: $GATEWAY_KEEPALIVE_TIMEOUT or 15)",
    )


def run(args: argparse.Namespace, settings: Settings, rules: Rules, rules_path: Path) -> int:
    """``gateway serve`` with its parsed options; the exit status."""
    header_timeout: float = args.header_timeout or settings.header_timeout
    keepalive_timeout: float = args.keepalive_timeout or settings.keepalive_timeout
    workers = args.workers or os.cpu_count() or 1
    if workers > 1:
        run_async(check_serving(rules, os.environ))  # refuse before starting any worker
        os.environ["GATEWAY_HEADER_TIMEOUT"] = str(header_timeout)
        os.environ["GATEWAY_KEEPALIVE_TIMEOUT"] = str(keepalive_timeout)
        return supervise(settings, rules_path, args.host, args.port, workers)
    return run_async(
        serve(
            settings,
            rules,
            rules_path,
            args.host,
            args.port,
            reuse_port=args.reuse_port,
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
        )
    )


async def serve(
    settings: Settings,
    rules: Rules,
    rules_path: Path,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    header_timeout: float,
    keepalive_timeout: float,
) -> int:
    """Serve until SIGTERM or SIGINT (or, for a worker, its supervisor's death), reloading
    the rules on SIGHUP; 0 once stopped, 1 when a worker's supervisor is already gone."""
    for problem in rules.margin_problems():
        log.warning("pricing check: %s", problem)
    supervisor = supervisor_pid() if reuse_port else None  # a worker of serve --workers
    if supervisor is not None:
        die_with_parent()
        if os.getppid() != supervisor:  # it died before we could ask
            log.error("the supervisor (pid %d) is gone; not starting", supervisor)
            return 1
    # What the rules make must load before any store is opened: a bad key file is
    # reported as such, not after (or as) a database error.
    await check_serving(rules, os.environ)
    async with open_ledger(settings, rules) as ledger, open_limiter(settings, rules) as limiter:
        app = build_app(rules, ledger, limiter, watch=rules_path)
        # On SIGTERM: stop accepting, give handlers the longest upstream timeout to finish,
        # then the app's cleanup waits for every exchange to settle.
        grace = max((r.upstream.timeout_seconds for r in rules.routes), default=30) + 5
        async with listening(
            app,
            host,
            port,
            reuse_port=reuse_port,
            shutdown_timeout=grace,
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
        ):
            log.info(
                "gateway listening on http://%s:%d with rules %s (version %s, %d routes)",
                host,
                port,
                rules.source,
                rules.version,
                len(rules.routes),
            )
            tune_gc()
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(reload_rules(app, rules_path))
            )
            await wait_for_signal(supervisor=supervisor)
            log.info("shutting down: finishing in-flight requests")
    return 0

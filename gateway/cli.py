"""The ``gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.embedded import EmbeddedUnavailable, start_postgres, start_valkey
from gateway.errors import ConfigError, LedgerError, LedgerUnavailable
from gateway.ledger import Ledger
from gateway.limits.config import Effective
from gateway.limits.limiter import Limiter
from gateway.logs import configure as configure_logs
from gateway.rules import Route, Rules, load_rules
from gateway.settings import Settings

log = logging.getLogger("gateway.cli")

EPILOG = """\
environment:
  DATABASE_URL        PostgreSQL for the ledger; unset: an embedded PostgreSQL in the data dir
  REDIS_URL           Redis (or Valkey) for the limits; unset: an embedded Valkey in the data dir
  GATEWAY_DB_SCHEMA   schema to use in that database (default: the server's search_path)
  GATEWAY_REDIS_PREFIX  prefix of every Redis key the gateway writes (default gw:)
  GATEWAY_DATA_DIR    data directory for the embedded servers (default ./.gateway)
  GATEWAY_RULES       rules file (default ./rules.yaml; --rules overrides)
  GATEWAY_JWT_SECRET  shared secret for HS256/384/512 tokens (name set by auth.secret_env)
  GATEWAY_LOG_LEVEL   DEBUG, INFO (default), WARNING or ERROR
  GATEWAY_LOG_FORMAT  json (default for serve) or text (default for everything else)
  GATEWAY_ADMIN_TOKEN a bearer token that opens /v1/admin/ (besides the admin role)
"""


class CommandError(Exception):
    """A command failed in a way the operator can fix; the message says how."""


def parse_duration(text: str) -> int:
    """'90' or '90s', '15m', '1h', '7d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 90s, 15m, 1h or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A metering reverse proxy that sells AI endpoints as prepaid tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--rules", type=Path, help="rules file (default: $GATEWAY_RULES or ./rules.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. It reloads its rules file when it changes and on SIGHUP, "
        "and on SIGTERM stops accepting, finishes and settles requests in flight, then exits.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="processes sharing the port (SO_REUSEPORT); default one per core",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser(
        "demo",
        help="run the gateway with embedded stores, a sample upstream and a seeded organization",
    )
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument(
        "--upstream-port", type=int, default=0, help="sample upstream port (default: any free)"
    )
    p.add_argument("--once", action="store_true", help="run the scripted tour, then exit")

    sub.add_parser("migrate", help="apply database migrations and sync plans from the rules")

    org = sub.add_parser("org", help="manage organizations").add_subparsers(
        dest="org_command", required=True, metavar="ACTION"
    )
    p = org.add_parser("create", help="create an organization on a plan")
    p.add_argument("org")
    p.add_argument("--plan", required=True)
    p = org.add_parser("set-plan", help="move an organization to another plan now")
    p.add_argument("org")
    p.add_argument("plan")
    p = org.add_parser(
        "set-license",
        help="set the license state: active, past_due (starts the grace period), "
        "suspended or canceled",
    )
    p.add_argument("org")
    p.add_argument("state", choices=("active", "past_due", "suspended", "canceled"))

    p = sub.add_parser("grant", help="add purchased (or allowance) tokens to an organization")
    p.add_argument("org")
    p.add_argument("token_type")
    p.add_argument("amount", type=positive_int)
    p.add_argument("--reason", default=None, help="recorded in the journal")
    p.add_argument("--bucket", choices=("purchased", "allowance"), default="purchased")

    quota = sub.add_parser(
        "quota", help="cap what one user or team may spend of a token type per period"
    ).add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    for action in ("set", "clear"):
        p = quota.add_parser(action, help=f"{action} a quota")
        p.add_argument("org")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--team")
        p.add_argument("token_type")
        if action == "set":
            p.add_argument("amount", type=int)
    team = sub.add_parser("team", help="manage the teams quotas apply to").add_subparsers(
        dest="team_command", required=True, metavar="ACTION"
    )
    p = team.add_parser("set", help="make a team's members exactly these users")
    p.add_argument("org")
    p.add_argument("team")
    p.add_argument("users", nargs="*")

    p = sub.add_parser("balance", help="show an organization's balances")
    p.add_argument("org")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("token", help="mint an HS256 token with the configured secret (local use)")
    p.add_argument("--org", required=True)
    p.add_argument("--user", required=True)
    p.add_argument(
        "--ttl", type=parse_duration, default=3600, help="lifetime, e.g. 15m, 1h, 7d (default 1h)"
    )
    p.add_argument("--role", action="append", default=[], help="a role claim (repeatable)")

    rules = sub.add_parser("rules", help="check rules files").add_subparsers(
        dest="rules_command", required=True, metavar="ACTION"
    )
    p = rules.add_parser("check", help="validate a rules file; exit 1 listing every error")
    p.add_argument("file", nargs="?", type=Path)
    p = rules.add_parser(
        "explain",
        help="show which route a request matches and, with a token, each gate's verdict now",
    )
    p.add_argument("method", help="e.g. POST")
    p.add_argument("path", help="e.g. /v1/leads/generate")
    p.add_argument("--token", help="a caller's JWT: adds plan, limits and balance verdicts")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("unblock", help="lift a block set by the abuse limits")
    p.add_argument("--org", help="the organization (with --user: one of its users)")
    p.add_argument("--user", help="a user of --org")
    p.add_argument("--ip", help="a client address blocked for repeated invalid tokens")

    sub.add_parser("audit", help="check the ledger's invariants; exit 1 naming each violation")
    sub.add_parser("sweep", help="expire overdue reservations and refresh ended periods once")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logs(
        settings.log_level,
        settings.log_format or ("json" if args.command == "serve" else "text"),
    )
    rules_path: Path = args.rules or settings.rules_path
    try:
        return _dispatch(args, settings, rules_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (CommandError, LedgerUnavailable, EmbeddedUnavailable) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except LedgerError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings, rules_path: Path) -> int:
    command = args.command
    if command == "rules" and args.rules_command == "check":
        return _rules_check(args.file or rules_path)
    rules = load_rules(rules_path)
    args.rules_loaded = rules
    if command == "rules":
        return run_async(_explain(settings, rules, args))
    if command == "token":
        return _token(args, rules)
    if command == "unblock":
        return run_async(_unblock(settings, rules, args))
    if command == "serve":
        workers = args.workers or os.cpu_count() or 1
        if workers > 1:
            from gateway.workers import supervise

            return supervise(settings, rules_path, args.host, args.port, workers)
        return run_async(_serve(settings, rules, rules_path, args.host, args.port, args.reuse_port))
    if command == "demo":
        from gateway.demo import run_demo

        return run_async(run_demo(settings, rules_path, args.port, args.upstream_port, args.once))
    handlers: dict[str, Callable[[Ledger], Awaitable[int]]] = {
        "migrate": lambda ledger: _migrate(),
        "org": lambda ledger: _org(ledger, args),
        "grant": lambda ledger: _grant(ledger, args),
        "balance": lambda ledger: _balance(ledger, args),
        "quota": lambda ledger: _quota(ledger, args),
        "team": lambda ledger: _team(ledger, args),
        "audit": _audit,
        "sweep": _sweep,
    }

    async def run() -> int:
        async with open_ledger(settings, rules) as ledger:
            return await handlers[command](ledger)

    return run_async(run())


async def _migrate() -> int:
    print("migrations applied; plans synced from the rules")
    return 0


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings, rules: Rules) -> AsyncIterator[Ledger]:
    """Connect to the configured (or embedded) PostgreSQL, migrate, and sync plans."""
    dsn = settings.database_url
    if dsn is None:
        dsn = await asyncio.to_thread(start_postgres, settings.data_dir)
    ledger = await Ledger.connect(dsn, schema=settings.database_schema)
    try:
        applied = await ledger.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        await ledger.sync_plans(rules.plan_allowances())
        yield ledger
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def open_limiter(settings: Settings, rules: Rules) -> AsyncIterator[Limiter]:
    """Connect to the configured (or embedded) Redis."""
    url, stop = settings.redis_url, None
    if url is None:
        url, stop = await asyncio.to_thread(start_valkey, settings.data_dir)
    assert url is not None
    limiter = Limiter.from_url(url, rules.document.limits, prefix=settings.redis_prefix)
    try:
        yield limiter
    finally:
        await limiter.close()
        if stop is not None:
            await asyncio.to_thread(stop)


async def _unblock(settings: Settings, rules: Rules, args: argparse.Namespace) -> int:
    if args.user and not args.org:
        raise CommandError("--user needs --org")
    if not (args.org or args.ip):
        raise CommandError("say what to unblock: --org ORG [--user USER] or --ip ADDRESS")
    async with open_limiter(settings, rules) as limiter:
        lifted = await limiter.unblock(args.org, args.user, args.ip)
    who = " ".join(
        f"{k} {v}" for k, v in (("org", args.org), ("user", args.user), ("ip", args.ip)) if v
    )
    print(f"lifted {lifted} block(s) for {who}" if lifted else f"no block was in force for {who}")
    return 0


def _rules_check(path: Path) -> int:
    try:
        rules = load_rules(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    doc = rules.document
    margins = rules.margin_problems()
    for problem in margins:
        print(f"{path}: {problem}", file=sys.stderr)
    if margins:
        print(f"{path}: valid, but {len(margins)} plan(s) fail the pricing check", file=sys.stderr)
        return 1
    print(
        f"{path}: ok (version {rules.version}): {len(rules.routes)} route(s), "
        f"{len(doc.token_types)} token type(s), {len(doc.plans)} plan(s), "
        f"{len(doc.upstreams)} upstream(s)"
    )
    return 0


def _token(args: argparse.Namespace, rules: Rules) -> int:
    from gateway.auth import mint_token

    auth = rules.document.auth
    secret = os.environ.get(auth.secret_env)
    if not secret:
        raise CommandError(f"{auth.secret_env} is not set: export the shared secret first")
    print(
        mint_token(
            secret,
            org=args.org,
            user=args.user,
            ttl_seconds=args.ttl,
            roles=args.role,
            claims=auth.claims,
            extra=_standard_claims(rules),
        )
    )
    return 0


def _standard_claims(rules: Rules) -> dict[str, Any]:
    auth = rules.document.auth
    extra: dict[str, Any] = {}
    if auth.issuer:
        extra["iss"] = auth.issuer
    if auth.audience:
        extra["aud"] = auth.audience
    return extra


async def _org(ledger: Ledger, args: argparse.Namespace) -> int:
    if args.org_command == "create":
        await ledger.create_org(args.org, args.plan)
        print(f"organization '{args.org}' created on plan '{args.plan}'")
    elif args.org_command == "set-license":
        changed = await ledger.set_license(args.org, args.state, actor="cli")
        print(
            f"organization '{args.org}' license is now {args.state}"
            if changed
            else f"organization '{args.org}' license was already {args.state}"
        )
    else:
        changed = await ledger.set_plan(args.org, args.plan, actor="cli")
        print(
            f"organization '{args.org}' moved to plan '{args.plan}'"
            if changed
            else f"organization '{args.org}' is already on plan '{args.plan}'"
        )
    return 0


async def _grant(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.grant(
        args.org,
        args.token_type,
        args.amount,
        bucket=args.bucket,
        actor="cli",
        reason=args.reason,
    )
    print(
        f"granted {args.amount} {args.token_type} tokens to '{args.org}' ({args.bucket}); "
        f"available now {account.available}"
    )
    return 0


async def _quota(ledger: Ledger, args: argparse.Namespace) -> int:
    subject = f"user:{args.user}" if args.user else f"team:{args.team}"
    if args.token_type not in ledger_token_types(args):
        raise CommandError(f"unknown token type '{args.token_type}'")
    amount = args.amount if args.quota_command == "set" else None
    if amount is not None and amount < 0:
        raise CommandError("a quota cannot be negative")
    await ledger.set_quota(args.org, subject, args.token_type, amount, actor="cli")
    print(
        f"{subject} of '{args.org}' may spend {amount} {args.token_type} tokens per period"
        if amount is not None
        else f"{subject} of '{args.org}' has no {args.token_type} quota now"
    )
    return 0


def ledger_token_types(args: argparse.Namespace) -> set[str]:
    return set(args.rules_loaded.document.token_types)


async def _team(ledger: Ledger, args: argparse.Namespace) -> int:
    await ledger.set_team(args.org, args.team, args.users, actor="cli")
    print(f"team '{args.team}' of '{args.org}': {', '.join(args.users) or 'no members'}")
    return 0


async def _balance(ledger: Ledger, args: argparse.Namespace) -> int:
    org = await ledger.organization(args.org)
    if org is None:
        raise CommandError(f"organization '{args.org}' does not exist")
    accounts = await ledger.balances(args.org)
    if args.json:
        print(
            json.dumps(
                {
                    "organization": args.org,
                    "plan": org["plan"],
                    "accounts": {
                        a.token_type: {
                            "available": a.available,
                            "allowance": a.allowance,
                            "purchased": a.purchased,
                            "reserved": a.reserved,
                            "allocated": a.allocated,
                            "period_end": a.period_end.isoformat(),
                        }
                        for a in accounts
                    },
                },
                indent=2,
            )
        )
        return 0
    print(f"organization {args.org}  plan {org['plan']}")
    print(
        f"{'token type':<20}{'available':>10}{'allowance':>10}{'purchased':>10}"
        f"{'reserved':>10}  refreshes"
    )
    for a in accounts:
        print(
            f"{a.token_type:<20}{a.available:>10}{a.allowance:>10}{a.purchased:>10}"
            f"{a.reserved:>10}  {a.period_end:%Y-%m-%d %H:%M} UTC"
        )
    return 0


async def _audit(ledger: Ledger) -> int:
    violations = await ledger.audit()
    if not violations:
        print("ledger audit: every invariant holds")
        return 0
    for v in violations:
        print(f"violation: {v}", file=sys.stderr)
    print(f"ledger audit: {len(violations)} violation(s)", file=sys.stderr)
    return 1


async def _sweep(ledger: Ledger) -> int:
    expired = await ledger.expire_overdue()
    refreshed = await ledger.refresh_overdue()
    print(f"expired {expired} reservation(s); refreshed {refreshed} account(s)")
    return 0


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


async def _explain(settings: Settings, rules: Rules, args: argparse.Namespace) -> int:
    from gateway.auth import Authenticator
    from gateway.explain import explain, render
    from gateway.limits.config import effective

    if args.token is None:
        report = await explain(rules, args.method.upper(), args.path)
    else:
        auth = Authenticator(rules.document.auth)
        try:
            async with open_ledger(settings, rules) as ledger, open_limiter(settings, rules) as lim:

                async def limits_for(org: str, route: Route) -> Effective:
                    found = await ledger.organization(org)
                    plan = str(found["plan"]) if found else None
                    return effective(rules.document.limits, plan, route.config.limits)

                report = await explain(
                    rules,
                    args.method.upper(),
                    args.path,
                    token=args.token,
                    auth=auth,
                    ledger=ledger,
                    limiter=lim,
                    limits_for=limits_for,
                )
        finally:
            await auth.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


async def _serve(
    settings: Settings, rules: Rules, rules_path: Path, host: str, port: int, reuse_port: bool
) -> int:
    from gateway.app import build_app, reload_rules

    for problem in rules.margin_problems():
        log.warning("pricing check: %s", problem)
    if reuse_port:  # a worker of serve --workers
        parent = os.getppid()
        die_with_parent()
        if os.getppid() != parent:  # it died before we asked
            return 1
    async with open_ledger(settings, rules) as ledger, open_limiter(settings, rules) as limiter:
        app = build_app(rules, ledger, limiter, watch=rules_path)
        # On SIGTERM: stop accepting, give handlers the longest upstream timeout to finish,
        # then the app's cleanup waits for every exchange to settle.
        grace = max((r.upstream.timeout_seconds for r in rules.routes), default=30) + 5
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=False, shutdown_timeout=grace
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, host, port, reuse_address=not reuse_port, reuse_port=reuse_port or None
            )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        log.info(
            "gateway listening on http://%s:%d with rules %s (version %s, %d routes)",
            host,
            port,
            rules.source,
            rules.version,
            len(rules.routes),
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(reload_rules(app, rules_path))
        )
        await wait_for_signal(orphan_check=reuse_port)
        log.info("shutting down: finishing in-flight requests")
        await runner.cleanup()
    return 0


def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM (a graceful stop) when its
    parent dies: a worker must not outlive its supervisor."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor; polling for it instead")


async def wait_for_signal(*, orphan_check: bool = False) -> None:
    """Until SIGINT or SIGTERM; with ``orphan_check`` (a worker of ``serve --workers``),
    also until the supervisor is gone, so that no worker outlives it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        # Polling: nothing signals a parent's death portably.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(1)
        log.error("the supervisor (pid %d) is gone; shutting down", parent)
        stop.set()

    watcher = asyncio.create_task(watch_parent()) if orphan_check else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_secret(data_dir: Path) -> str:
    """A per-installation secret for the demo, kept so minted tokens survive restarts."""
    path = data_dir / "demo-jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


if __name__ == "__main__":
    sys.exit(main())

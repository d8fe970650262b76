"""The ``gateway`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway import __version__, serving
from gateway.auth import mint_token
from gateway.demo import run_demo
from gateway.embedded import EmbeddedUnavailable
from gateway.errors import ConfigError, LedgerError, LedgerUnavailable
from gateway.explain import explain, render
from gateway.ledger import Ledger, archive
from gateway.limits.config import Effective, effective
from gateway.logs import configure as configure_logs
from gateway.proxy import new_session
from gateway.rules import Route, Rules, load_rules
from gateway.runtime import (
    CommandError,
    build_active,
    check_serving,
    open_ledger,
    open_limiter,
    run_async,
)
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
  GATEWAY_HEADER_TIMEOUT     serve's --header-timeout, in seconds (default 10)
  GATEWAY_KEEPALIVE_TIMEOUT  serve's --keepalive-timeout, in seconds (default 15)
"""


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


RULES_HELP = "rules file (default: $GATEWAY_RULES or ./rules.yaml)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A metering reverse proxy that sells AI endpoints as prepaid tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--rules", type=Path, help=RULES_HELP)
    # Every command takes --rules after its name too; SUPPRESS keeps a value given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rules", type=Path, default=argparse.SUPPRESS, help=RULES_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(group: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=help, **kw)
        return parser

    def actions(name: str, help: str) -> Any:
        dest = f"{name}_command"
        return cmd(sub, name, help).add_subparsers(dest=dest, required=True, metavar="ACTION")

    p = cmd(
        sub,
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
    serving.add_timeout_arguments(p)

    demo_help = "run the gateway with embedded stores, a sample upstream and seeded organizations"
    p = cmd(sub, "demo", help=demo_help)
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument(
        "--upstream-port", type=int, default=0, help="sample upstream port (default: any free)"
    )
    p.add_argument("--once", action="store_true", help="run the scripted tour, then exit")

    cmd(sub, "migrate", help="apply database migrations and sync plans from the rules")

    org = actions("org", "manage organizations")
    p = cmd(org, "create", help="create an organization on a plan")
    p.add_argument("org")
    p.add_argument("--plan", required=True)
    p = cmd(org, "set-plan", help="move an organization to another plan now")
    p.add_argument("org")
    p.add_argument("plan")
    p = cmd(
        org,
        "set-license",
        help="set the license state: active, past_due (starts the grace period), "
        "suspended or canceled",
    )
    p.add_argument("org")
    p.add_argument("state", choices=("active", "past_due", "suspended", "canceled"))

    p = cmd(sub, "grant", help="add purchased (or allowance) tokens to an organization")
    p.add_argument("org")
    p.add_argument("token_type")
    p.add_argument("amount", type=positive_int)
    p.add_argument("--reason", default=None, help="recorded in the journal")
    p.add_argument("--bucket", choices=("purchased", "allowance"), default="purchased")

    quota = actions("quota", "cap what one user or team may spend of a token type per period")
    for action in ("set", "clear"):
        p = cmd(quota, action, help=f"{action} a quota")
        p.add_argument("org")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--team")
        p.add_argument("token_type")
        if action == "set":
            p.add_argument("amount", type=int)
    team = actions("team", "manage the teams quotas apply to")
    p = cmd(team, "set", help="make a team's members exactly these users")
    p.add_argument("org")
    p.add_argument("team")
    p.add_argument("users", nargs="*")

    p = cmd(sub, "balance", help="show an organization's balances")
    p.add_argument("org")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd(sub, "token", help="mint an HS256 token with the configured secret (local use)")
    p.add_argument("--org", required=True)
    p.add_argument("--user", required=True)
    p.add_argument(
        "--ttl", type=parse_duration, default=3600, help="lifetime, e.g. 15m, 1h, 7d (default 1h)"
    )
    p.add_argument("--role", action="append", default=[], help="a role claim (repeatable)")

    rules = actions("rules", "check rules files")
    p = cmd(rules, "check", help="check a rules file as serve would load it; exit 1 if not")
    p.add_argument("file", nargs="?", type=Path, help="default: the --rules file")
    p = cmd(rules, "explain", help="which route a request matches; with --token, each verdict")
    p.add_argument("method", help="e.g. POST")
    p.add_argument("path", help="e.g. /v1/leads/generate")
    p.add_argument("--token", help="a caller's JWT: adds plan, limits and balance verdicts")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd(sub, "unblock", help="lift a block set by the abuse limits")
    p.add_argument("--org", help="the organization (with --user: one of its users)")
    p.add_argument("--user", help="a user of --org")
    p.add_argument("--ip", help="a client address blocked for repeated invalid tokens")

    cmd(sub, "audit", help="check the ledger's invariants; exit 1 naming each violation")
    cmd(sub, "sweep", help="expire overdue reservations and refresh ended periods once")
    p = cmd(
        sub,
        "archive",
        help="checkpoint the balances, then export and detach old months of the journal",
        description=archive.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    archive.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    log_format = settings.log_format or ("json" if args.command == "serve" else "text")
    configure_logs(settings.log_level, log_format)
    rules_path: Path = args.rules or settings.rules_path
    try:
        return _dispatch(args, settings, rules_path)
    except ConfigError as exc:
        _fail(args.command, log_format, str(exc), [f"{exc.source}: {e}" for e in exc.errors])
    except (CommandError, LedgerUnavailable, LedgerError, EmbeddedUnavailable) as exc:
        _fail(args.command, log_format, str(exc))
    except KeyboardInterrupt:
        return 130
    return 1


def _fail(command: str, log_format: str, message: str, errors: list[str] | None = None) -> None:
    """Say why the command failed: one line per error for people; one JSON log line when
    the log is JSON (serve), so that a log collector sees one event."""
    if log_format != "json":
        print(message if errors else f"gateway: {message}", file=sys.stderr)
        return
    extra = {"event": "command_failed", "command": command} | ({"errors": errors} if errors else {})
    log.error("; ".join(errors) if errors else message, extra=extra)


def _dispatch(args: argparse.Namespace, settings: Settings, rules_path: Path) -> int:
    command = args.command
    if command == "rules" and args.rules_command == "check":
        return _rules_check(args.file or rules_path)
    if command == "demo":
        return run_async(run_demo(settings, rules_path, args.port, args.upstream_port, args.once))
    rules = load_rules(rules_path)
    if command == "rules":
        return run_async(_explain(settings, rules, args))
    if command == "token":
        return _token(args, rules)
    if command == "unblock":
        return run_async(_unblock(settings, rules, args))
    if command == "serve":
        return serving.run(args, settings, rules, rules_path)
    handlers: dict[str, Callable[[Ledger], Awaitable[int]]] = {
        "migrate": lambda ledger: _migrate(),
        "org": lambda ledger: _org(ledger, args),
        "grant": lambda ledger: _grant(ledger, args),
        "balance": lambda ledger: _balance(ledger, args),
        "quota": lambda ledger: _quota(ledger, args, rules),
        "team": lambda ledger: _team(ledger, args),
        "audit": _audit,
        "sweep": _sweep,
        "archive": lambda ledger: archive.command(ledger, args),
    }

    async def run() -> int:
        async with open_ledger(settings, rules) as ledger:
            return await handlers[command](ledger)

    return run_async(run())


async def _migrate() -> int:
    print("migrations applied; plans synced from the rules")
    return 0


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
    """What serve would refuse, serve's way: the file, then the objects built from it."""
    try:
        rules = load_rules(path)
        run_async(check_serving(rules, os.environ))
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
    auth = rules.document.auth
    secret = os.environ.get(auth.secret_env)
    if not secret:
        raise CommandError(f"{auth.secret_env} is not set: export the shared secret first")
    standard = {k: v for k, v in (("iss", auth.issuer), ("aud", auth.audience)) if v}
    print(
        mint_token(
            secret,
            org=args.org,
            user=args.user,
            ttl_seconds=args.ttl,
            roles=args.role,
            claims=auth.claims,
            extra=standard,
        )
    )
    return 0


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
        args.org, args.token_type, args.amount, bucket=args.bucket, actor="cli", reason=args.reason
    )
    print(
        f"granted {args.amount} {args.token_type} tokens to '{args.org}' ({args.bucket}); "
        f"available now {account.available}"
    )
    return 0


async def _quota(ledger: Ledger, args: argparse.Namespace, rules: Rules) -> int:
    subject = f"user:{args.user}" if args.user else f"team:{args.team}"
    if args.token_type not in rules.document.token_types:
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
        amounts = ("available", "allowance", "purchased", "reserved", "allocated")
        by_type = {
            a.token_type: {k: getattr(a, k) for k in amounts} | {"period_end": a.period_end}
            for a in accounts
        }
        document = {"organization": args.org, "plan": org["plan"], "accounts": by_type}
        print(json.dumps(document, indent=2, default=datetime.isoformat))
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


async def _explain(settings: Settings, rules: Rules, args: argparse.Namespace) -> int:
    if args.token is None:
        report = await explain(rules, args.method.upper(), args.path)
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    async with new_session() as session:
        active = build_active(rules, os.environ, session)
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
                    auth=active.auth,
                    ledger=ledger,
                    limiter=lim,
                    limits_for=limits_for,
                )
        finally:
            await active.auth.close()
            await active.alerter.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

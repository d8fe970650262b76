"""Settings from the environment. rules.yaml says what is sold; these say where things are,
how many connections to PostgreSQL each process may hold, and how long a client may keep
a connection without sending a request."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HEADER_TIMEOUT = 10.0  # seconds a client has to send a request's headers
KEEPALIVE_TIMEOUT = 15.0  # seconds an idle kept-alive connection stays open
# Set by ``serve --workers`` for each worker: the pid of the supervisor it must not outlive.
SUPERVISOR_PID = "GATEWAY_SUPERVISOR_PID"
# Connections to PostgreSQL per gateway process (each worker of `serve --workers` is one):
# opened at start, and the most it may hold. Every process of every replica may hold the
# most at once, so workers x replicas x DB_POOL_MAX must fit what the server (or PgBouncer)
# allows.
DB_POOL_MIN = 2
DB_POOL_MAX = 20
# What may stand between the gateway and PostgreSQL: nothing, or a pooler that hands out
# server connections per transaction (PgBouncer's pool_mode = transaction, or alike).
Pooler = Literal["pgbouncer"]


def parse_seconds(text: str) -> float:
    """'10' or '0.5' -> seconds. Raises ``ValueError`` saying why unless it is a positive,
    finite number."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive number of seconds, got '{text}'")
    return value


def parse_count(text: str, *, least: int) -> int:
    """'20' -> 20. Raises ``ValueError`` saying why unless it is a whole number of at least
    ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a whole number") from None
    if value < least:
        raise ValueError(f"must be at least {least}, got '{text}'")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None: start an embedded PostgreSQL in data_dir
    database_schema: str | None  # None: the server's default search_path
    redis_url: str | None  # None: start an embedded Valkey in data_dir
    redis_prefix: str  # every key the gateway writes to Redis starts with it
    data_dir: Path
    rules_path: Path
    log_level: str
    log_format: str | None  # json | text; None: json for serve, text otherwise
    header_timeout: float = HEADER_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    db_pool_min: int = DB_POOL_MIN
    db_pool_max: int = DB_POOL_MAX
    db_pooler: Pooler | None = None  # None: the gateway speaks to PostgreSQL itself

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Raises ``ValueError`` naming each variable whose value is not usable."""
        env = os.environ if environ is None else environ
        errors: list[str] = []

        def seconds(name: str, default: float) -> float:
            try:
                return parse_seconds(env[name]) if env.get(name) else default
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                return default

        def count(name: str, default: int, least: int) -> int | None:
            try:
                return parse_count(env[name], least=least) if env.get(name) else default
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                return None

        pool_min = count("GATEWAY_DB_POOL_MIN", DB_POOL_MIN, 0)
        pool_max = count("GATEWAY_DB_POOL_MAX", DB_POOL_MAX, 1)
        if pool_min is not None and pool_max is not None and pool_min > pool_max:
            errors.append(
                f"GATEWAY_DB_POOL_MIN: {pool_min} is more than GATEWAY_DB_POOL_MAX ({pool_max})"
            )
        pooler = (env.get("GATEWAY_DB_POOLER") or "none").lower()
        if pooler not in ("none", "pgbouncer"):
            errors.append(
                f"GATEWAY_DB_POOLER: must be pgbouncer or none, got '{env['GATEWAY_DB_POOLER']}'"
            )

        settings = cls(
            database_url=env.get("DATABASE_URL") or None,
            database_schema=env.get("GATEWAY_DB_SCHEMA") or None,
            redis_url=env.get("REDIS_URL") or None,
            redis_prefix=env.get("GATEWAY_REDIS_PREFIX") or "gw:",
            data_dir=Path(env.get("GATEWAY_DATA_DIR") or ".gateway"),
            rules_path=Path(env.get("GATEWAY_RULES") or "rules.yaml"),
            log_level=(env.get("GATEWAY_LOG_LEVEL") or "INFO").upper(),
            log_format=(env.get("GATEWAY_LOG_FORMAT") or "").lower() or None,
            header_timeout=seconds("GATEWAY_HEADER_TIMEOUT", HEADER_TIMEOUT),
            keepalive_timeout=seconds("GATEWAY_KEEPALIVE_TIMEOUT", KEEPALIVE_TIMEOUT),
            db_pool_min=DB_POOL_MIN if pool_min is None else pool_min,
            db_pool_max=DB_POOL_MAX if pool_max is None else pool_max,
            db_pooler="pgbouncer" if pooler == "pgbouncer" else None,
        )
        if errors:
            raise ValueError("; ".join(errors))
        return settings

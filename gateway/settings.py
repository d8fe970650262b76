"""Settings from the environment. rules.yaml says what is sold; these say where things are."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            database_schema=env.get("GATEWAY_DB_SCHEMA") or None,
            redis_url=env.get("REDIS_URL") or None,
            redis_prefix=env.get("GATEWAY_REDIS_PREFIX") or "gw:",
            data_dir=Path(env.get("GATEWAY_DATA_DIR") or ".gateway"),
            rules_path=Path(env.get("GATEWAY_RULES") or "rules.yaml"),
            log_level=(env.get("GATEWAY_LOG_LEVEL") or "INFO").upper(),
            log_format=(env.get("GATEWAY_LOG_FORMAT") or "").lower() or None,
        )

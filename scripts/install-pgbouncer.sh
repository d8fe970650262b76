#!/usr/bin/env bash
# Installs Debian's pgbouncer for tests/test_pgbouncer.py, once. Idempotent: does nothing
# when a pgbouncer is already on the PATH (or in /usr/sbin, where Debian puts it).
#
# Exits 0 with a message when it cannot install (no apt-get, not root): the tests then
# skip, except under CI, where they fail. Exits 1 only when apt-get itself fails.
set -euo pipefail

if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-pgbouncer: no apt-get here; install pgbouncer yourself (the PgBouncer tests skip without it)" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n) # never wait for a password prompt nobody will answer
else
  echo "install-pgbouncer: not root and no password-less sudo; run as root: apt-get install pgbouncer" >&2
  exit 0
fi

install() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends pgbouncer \
    > /dev/null 2> >(grep -v '^debconf: delaying package configuration' >&2)
}

echo "== installing Debian's pgbouncer for the PgBouncer tests (no recommended packages)"
# The package lists may be missing (a fresh container) or stale: refresh them only then.
if ! apt-cache show pgbouncer >/dev/null 2>&1 || ! install; then
  "${as_root[@]}" apt-get update -qq >/dev/null
  install
fi
# Debian's package starts a pgbouncer service where an init system runs; the tests start
# their own, so a service that did start is left as the operator's to keep or stop.
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || {
  echo "install-pgbouncer: apt-get installed pgbouncer but no pgbouncer binary is there" >&2
  exit 1
}

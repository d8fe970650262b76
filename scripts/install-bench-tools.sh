#!/usr/bin/env bash
# Installs Debian's wrk, the load generator `./dev bench` trusts, once (see
# apt-install.sh). Without wrk the bench falls back to its built-in Python generator.
# py-spy (profiling the gateway under load) is a PyPI package, in the test extra.
set -euo pipefail
command -v wrk >/dev/null 2>&1 || [ -x /usr/bin/wrk ] && exit 0
echo "== installing Debian's wrk for ./dev bench (no recommended packages)"
exec "$(dirname "$0")/apt-install.sh" install-bench-tools wrk wrk

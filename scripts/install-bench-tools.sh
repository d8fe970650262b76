#!/usr/bin/env bash
# Installs Debian's wrk, the load generator `./dev bench` trusts, once. Idempotent: does
# nothing when a wrk is already on the PATH (or in /usr/bin, where Debian puts it).
#
# Without wrk the bench falls back to its built-in Python generator, so this script exits 0
# with a message when it cannot install (no apt-get, not root). Exits 1 only when apt-get
# itself fails, or installs no wrk binary.
#
# py-spy (for profiling the gateway under load) is a PyPI package, not installed here.
set -euo pipefail

if command -v wrk >/dev/null 2>&1 || [ -x /usr/bin/wrk ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-bench-tools: no apt-get here; install wrk yourself (the bench falls back to its Python generator)" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n) # never wait for a password prompt nobody will answer
else
  echo "install-bench-tools: not root and no password-less sudo; run as root: apt-get install wrk" >&2
  exit 0
fi

install() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends wrk \
    > /dev/null 2> >(grep -v '^debconf: delaying package configuration' >&2)
}

echo "== installing Debian's wrk for ./dev bench (no recommended packages)"
# The package lists may be missing (a fresh container) or stale: refresh them only then.
if ! apt-cache show wrk >/dev/null 2>&1 || ! install; then
  "${as_root[@]}" apt-get update -qq >/dev/null
  install
fi
command -v wrk >/dev/null 2>&1 || [ -x /usr/bin/wrk ] || {
  echo "install-bench-tools: apt-get installed wrk but no wrk binary is there" >&2
  exit 1
}

#!/usr/bin/env bash
# Installs Debian's Chromium (/usr/bin/chromium) for the dashboard's browser tests, once.
# Idempotent: does nothing when it is already there. Never downloads a browser of its own
# (Playwright drives this one; `playwright install` is not used).
#
# Exits 0 when /usr/bin/chromium is there at the end, 1 otherwise, saying why. The tests
# skip without Chromium, except under CI, where they fail.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install Chromium as $CHROMIUM yourself" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n) # never wait for a password prompt nobody will answer
else
  echo "install-browser: not root and no password-less sudo; run as root: apt-get install chromium" >&2
  exit 1
fi

echo "== installing Debian's chromium for the dashboard tests (no recommended packages)"
"${as_root[@]}" apt-get update -q
if [ -z "${CI:-}" ]; then
  # Outside CI, say what will be installed before doing it.
  echo "install-browser: apt-get will install:"
  "${as_root[@]}" apt-get install --no-install-recommends -s chromium |
    sed -n 's/^Inst \([^ ]*\).*/  \1/p'
fi
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends chromium

if [ ! -x "$CHROMIUM" ]; then
  echo "install-browser: apt-get installed chromium but $CHROMIUM is missing" >&2
  exit 1
fi

#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser tests, once. Idempotent; never
# downloads a browser of its own (Playwright drives this one).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install Chromium yourself (tests skip without it)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-browser: not root and no sudo; the dashboard tests will skip" >&2
    exit 0
  fi
fi
echo "== installing Debian's chromium for the dashboard tests"
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null

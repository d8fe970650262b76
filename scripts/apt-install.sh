#!/usr/bin/env bash
# Installs Debian packages that a test suite or a tool needs, once, without recommended
# packages:
#
#   scripts/apt-install.sh WHO BINARY PACKAGE...
#
# Does nothing when BINARY is on the PATH (or in /usr/sbin or /usr/bin, where Debian puts
# it). Exits 0 with a message when it cannot install (no apt-get; not root and no
# password-less sudo), so that a developer's run goes on; exits 1 only when apt-get itself
# fails or installs no BINARY. The package lists are refreshed only when they lack the
# packages or the install fails (a fresh container has none).
set -euo pipefail

who=$1 binary=$2
shift 2
found() {
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || [ -x "/usr/bin/$binary" ]
}

found && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$who: no apt-get here; install $* yourself" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n) # never wait for a password prompt nobody will answer
else
  echo "$who: not root and no password-less sudo; run as root:" \
    "apt-get install --no-install-recommends $*" >&2
  exit 0
fi

install() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" \
    > /dev/null 2> >(grep -v '^debconf: delaying package configuration' >&2)
}

if ! apt-cache show "$@" >/dev/null 2>&1 || ! install "$@"; then
  "${as_root[@]}" apt-get update -qq >/dev/null
  install "$@"
fi
# A package's service (where an init system starts one) is not used: the tests and the
# bench start their own servers.
found || {
  echo "$who: apt-get installed $* but no $binary binary is there" >&2
  exit 1
}

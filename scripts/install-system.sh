#!/usr/bin/env bash
# Install a system package when its command is missing (only the binary; no service is
# enabled):
#
#   scripts/install-system.sh COMMAND DEBIAN_PACKAGE [BREW_FORMULA]
#
# make setup uses it for redis-server (rayfarm starts its own, with AOF in its data dir,
# for the embedded default and the tests) and chromium (tests/test_web.py drives the web
# page in it, headless, through Playwright launched on /usr/bin/chromium: no browser
# download).
set -euo pipefail
cmd=$1 deb=$2 brew=${3:-}
if command -v "$cmd" >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "$cmd missing: install it as root (apt-get install $deb)" >&2; exit 2; }
    SUDO="sudo"
  fi
  echo "rayfarm setup: installing $deb with apt-get ($cmd is missing)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "$deb" >/dev/null
elif [ -n "$brew" ] && command -v brew >/dev/null 2>&1; then
  echo "rayfarm setup: installing $brew with brew ($cmd is missing)"
  brew install --quiet "$brew"
else
  echo "$cmd missing and no apt-get${brew:+ or brew} here: install $deb and put $cmd on PATH" >&2
  exit 2
fi
command -v "$cmd" >/dev/null 2>&1

#!/usr/bin/env bash
# Install redis-server from the system's packages when it is not on PATH.
# rayfarm starts its own redis-server (with AOF, in its data dir) for the embedded
# default and for the tests, so only the binary is needed; no service is enabled.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "redis-server missing: install it as root (apt-get install redis-server)" >&2; exit 2; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
elif command -v brew >/dev/null 2>&1; then
  brew install redis
else
  echo "redis-server missing and no apt-get or brew here: install Redis 6+ and put redis-server on PATH, or set REDIS_URL" >&2
  exit 2
fi
command -v redis-server >/dev/null 2>&1

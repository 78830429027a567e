#!/usr/bin/env bash
# Install Debian's chromium when it is missing: tests/test_web.py drives the farm's web
# page in a real headless browser (Playwright, launched on /usr/bin/chromium, so no
# `playwright install` download is needed). Only the binary; nothing is enabled.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "chromium missing: install it as root (apt-get install chromium)" >&2; exit 2; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "chromium missing and no apt-get here: install Chromium and set RAYFARM_CHROMIUM to its binary" >&2
  exit 2
fi
command -v chromium >/dev/null 2>&1

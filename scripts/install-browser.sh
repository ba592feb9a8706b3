#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_mlflow_ui.py (Playwright drives /usr/bin/chromium;
# no browser is ever downloaded by Playwright). Idempotent: exits 0 at once when it is present.
# Needs root, or sudo without a password. Prints one line; on failure, apt's output and a reason
# on stderr.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  echo "install-browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) already installed at $CHROMIUM"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: apt-get not found; install Chromium at $CHROMIUM by other means" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  # -n: never wait for a password (make test runs unattended)
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-browser: needs root to install chromium: run 'sudo apt-get install chromium'" \
      "(or this script as root)" >&2
    exit 1
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq &&
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-browser: apt-get failed to install chromium (output above)" >&2
  exit 1
fi

if [ ! -x "$CHROMIUM" ]; then
  echo "install-browser: chromium was installed but $CHROMIUM is missing" >&2
  exit 1
fi
echo "install-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"

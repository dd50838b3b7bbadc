#!/usr/bin/env bash
# Headless Chromium for tests/pipeline/test_report.py (the report opened in a real browser).
# Debian (bookworm and later): apt's `chromium`. Elsewhere (Ubuntu, whose `chromium` is a snap that
# does not run in containers): Playwright's build, which needs https://cdn.playwright.dev reachable.
# Without either, that one test skips and says why. Usage: tests/install_browser.sh [VENV_BIN]
set -euo pipefail
BIN=${1:-.venv/bin}
have() { command -v "$1" >/dev/null 2>&1 && ! readlink -f "$(command -v "$1")" | grep -q snap; }
for b in chromium chromium-headless-shell google-chrome; do
  if have "$b"; then echo "browser: $(command -v "$b")"; exit 0; fi
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null && grep -qi '^ID=debian' /etc/os-release; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
  echo "browser: $(command -v chromium)"
  exit 0
fi
"$BIN/python" -m pip install -q playwright
if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
  "$BIN/python" -m playwright install --with-deps chromium-headless-shell
else
  "$BIN/python" -m playwright install chromium-headless-shell
fi
echo "browser: Playwright's chromium-headless-shell in ~/.cache/ms-playwright"

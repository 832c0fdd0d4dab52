#!/usr/bin/env bash
# Create .venv (if needed) and install dynoai with its test/dev extras, plus the
# mosquitto broker binary from Debian when it is missing (the MQTT tests start their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ "${DYNOAI_NO_APT:-0}" != "1" ] && ! command -v mosquitto >/dev/null 2>&1 \
   && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "warning: mosquitto not installed and no root: broker tests will be skipped" >&2
  fi
fi
# Headless Chromium renders the HTML report in tests/test_report.py (skipped without it).
if [ "${DYNOAI_NO_APT:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium not installed and not root: report rendering tests will be skipped" >&2
  fi
fi

#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run `dynoai simulate` against the built-in simulated dyno cell.
set -euo pipefail
cd "$(dirname "$0")/.."
DYNOAI_NO_APT=${DYNOAI_NO_APT:-0} bash scripts/setup.sh
exec .venv/bin/dynoai simulate "$@"

#!/usr/bin/env bash
# Install everything (if needed) and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q tests "$@"

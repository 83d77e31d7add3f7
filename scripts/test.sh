#!/usr/bin/env bash
# Install everything (if needed), run `ruff check` and the test suite; prints the wall time at the end.
#   bash scripts/test.sh                 the whole suite (CI: .ci/run)
#   bash scripts/test.sh --quick         without the slowest end-to-end runs (pytest -m "not slow";
#                                        the `slow` marker is registered in pytest.ini)
#   bash scripts/test.sh ARGS...         ARGS go to pytest (e.g. -p no:cacheprovider, -x, -k NAME)
#   VENV=path                            use another virtual environment (default: .venv here)
#   TEST_WORKERS=N                       pytest-xdist processes (default: auto, one per core; 0: none).
#                                        Each test module runs whole on one worker (--dist loadfile), so
#                                        its module-scoped fixtures are built once
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh"
cd "$ROOT"
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
start=$SECONDS
status=0
# lint first (the repository's ruff configuration, pyproject.toml); a finding fails the run
"$VENV/bin/python" -m ruff check --no-cache "$ROOT" || status=$?
workers="${TEST_WORKERS:-auto}"
xdist=(-n "$workers")
[ "$workers" = 0 ] || xdist+=(--dist loadfile)
# --durations: the slowest tests, for keeping the suite's time in check
"$VENV/bin/python" -m pytest -q "${xdist[@]}" --durations=15 tests ${args[@]+"${args[@]}"} || status=$?
elapsed=$((SECONDS - start))
printf '[test] wall time %dm %02ds (exit status %d)\n' $((elapsed / 60)) $((elapsed % 60)) "$status"
exit "$status"

#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install the plugin with its
# dependencies. Idempotent: a second run installs nothing new.
#   VENV=path  use another venv location (default: .venv in the repository)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# A CPU build of torch (an unpinned torch pulls a multi-GB CUDA build); numpy and
# cython first: fairseq-fixed builds its extensions against them.
"$PIP" install -q "torch==2.13.0" numpy cython
if ! "$VENV/bin/python" -c "import fairseq, fairscale, sentencepiece, pytest, hypothesis, matplotlib" 2>/dev/null; then
  echo "[install] installing fairseq-fixed, fairscale, sentencepiece, pytest (building fairseq takes ~3-5 minutes)"
fi
"$PIP" install -q -e "$ROOT[test]" matplotlib
"$VENV/bin/python" -c "import torch, fairseq, fairseq_stablemoe; print('[install] torch', torch.__version__, '| fairseq', fairseq.__version__, '| fairseq_stablemoe', fairseq_stablemoe.__version__)"

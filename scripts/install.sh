#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install the plugin with its
# dependencies. Idempotent: a second run installs nothing new.
#   VENV=path              use another venv location (default: .venv in the repository)
#   STABLEMOE_TORCH=cpu    (default) torch 2.13.0's CPU build (2.13.0+cpu, from PyTorch's CPU index;
#                          on macOS the plain wheel, which is a CPU build)
#   STABLEMOE_TORCH=cuda   torch 2.13.0 as PyPI serves it, the CUDA build on Linux (another CUDA version:
#                          install it from PyTorch's index into the venv first, then use keep; docs/gpu.md)
#   STABLEMOE_TORCH=keep   install no torch: use the one already in the environment (a cluster's or a
#                          container's build; torch >= 1.13)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment in $VENV"
  # keep: the environment's own torch must be visible in the venv
  if [ "${STABLEMOE_TORCH:-cpu}" = keep ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
PIP="$VENV/bin/pip"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# torch first, as chosen (an unpinned torch, or torch==2.13.0 alone, takes PyPI's multi-GB CUDA build on
# Linux); numpy and cython too: fairseq-fixed builds its extensions against them.
TORCH_VERSION=2.13.0
case "${STABLEMOE_TORCH:-cpu}" in
  cpu)
    if [ "$(uname -s)" = Darwin ]; then
      "$PIP" install -q "torch==$TORCH_VERSION"
    else
      "$PIP" install -q "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
    fi ;;
  cuda)
    # an installed CPU build (2.13.0+cpu) satisfies torch==2.13.0: remove it so that pip fetches PyPI's build
    if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null; then
      "$PIP" uninstall -q -y torch
    fi
    "$PIP" install -q "torch==$TORCH_VERSION" ;;
  keep) "$VENV/bin/python" -c "import torch" || { echo "[install] STABLEMOE_TORCH=keep, but $VENV has no torch: install one, or use STABLEMOE_TORCH=cpu or cuda" >&2; exit 2; } ;;
  *) echo "[install] STABLEMOE_TORCH=${STABLEMOE_TORCH}: use cpu (the default), cuda or keep" >&2; exit 2 ;;
esac
"$PIP" install -q numpy cython
if ! "$VENV/bin/python" -c "import fairseq, fairscale, sentencepiece, pytest, hypothesis, matplotlib" 2>/dev/null; then
  echo "[install] installing fairseq-fixed, fairscale, sentencepiece, pytest (building fairseq takes ~3-5 minutes)"
fi
"$PIP" install -q -e "$ROOT[test]" matplotlib
"$VENV/bin/python" -c "import torch, fairseq, fairseq_stablemoe; print('[install] torch', torch.__version__, '| fairseq', fairseq.__version__, '| fairseq_stablemoe', fairseq_stablemoe.__version__)"

#!/usr/bin/env bash
# Regenerates every CPU table of docs/performance.md (each benchmark replaces its own block of the page;
# see benchmarks/markdown.py). About 15 minutes on an idle 2-core CPU. The layer and the experts run on
# one intra-op thread (--threads 1), which keeps their ratios steadier when other processes load the CPU.
# The GPU tables come from scripts/gpu_check.sh.
#   bash benchmarks/tables.sh [PAGE]      PYTHON=python picks the interpreter (default: .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PAGE="${1:-docs/performance.md}"
L=(benchmarks/moe_layer.py --threads 1 --no-fairscale --steady-malloc --cases stage1 stage2 inference --markdown "$PAGE")
"$PY" "${L[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 5
"$PY" "${L[@]}" --tokens 8192 --dim 512 --ffn 2048 --experts 16 64 --repeats 3
"$PY" "${L[@]}" --tokens 2048 --dim 512 --ffn 2048 --experts 4 16 --repeats 5
"$PY" "${L[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 5 --backend grouped_mm
E=(benchmarks/expert_compute.py --threads 1 --steady-malloc --markdown "$PAGE")
"$PY" "${E[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 5
"$PY" "${E[@]}" --tokens 8192 --dim 512 --ffn 2048 --experts 16 64 --repeats 3
"$PY" "${E[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --skew 0.75  # padded_bmm's memory, skewed routing
"$PY" benchmarks/all_to_all_share.py --markdown "$PAGE"
"$PY" benchmarks/train_throughput.py --updates 30 --markdown "$PAGE"
"$PY" benchmarks/train_throughput.py --counts --updates 60 --rounds 3 --markdown "$PAGE"
"$PY" benchmarks/count_traffic.py --measure --markdown "$PAGE"  # the routing counts' collective traffic per update against W

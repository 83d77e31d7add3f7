#!/usr/bin/env bash
# Every GPU check in one call (about 8 minutes at most), on a machine with one CUDA GPU:
#   (a) nvidia-smi, Python, torch and CUDA versions; (b) the environment: fairseq as installed, else
#   .gpu_site/ (built on a machine with PyPI by scripts/gpu_prepare.sh and carried), else a pip install;
#   (c) pytest tests/test_cuda.py; (d) benchmarks/moe_layer.py on CUDA in bf16 at the paper's base expert
#   shape (d=768, f=3072, 3 sublayers, 16384 tokens = its --max-tokens per GPU, N_local 1 4 16; grouped
#   and loop backends) and at the small-expert shape (T=4096, d=256, f=1024, N=8 32; bf16 and fp32).
# Results go to $OUT if set, else ./gpu_check_out: summary.txt (what ran, exit codes), versions.txt,
# test_cuda.txt, bench_*.txt, and performance_gpu.md (the benchmarks' tables, as blocks for
# docs/performance.md). Every benchmark file names the GPU in its header line.
#   bash scripts/gpu_check.sh            PYTHON=python3 (default) picks the interpreter
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RES="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$RES/summary.txt"; }
step() {  # step NAME LIMIT_S FILE CMD...: run with a time limit, output to FILE and the terminal
  local name=$1 limit=$2 file=$3; shift 3
  log "$name: start (limit ${limit}s) -> $(basename "$file")"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$file") 2>&1
  local rc=$?
  log "$name: exit $rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
}

# (a) versions
{
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], sys.executable, platform.machine())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "| capability", f"{p.major}.{p.minor}",
          "| memory GiB", round(p.total_memory / 2**30, 1), "| SMs", p.multi_processor_count)
EOF
} 2>&1 | tee "$RES/versions.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "STOP: $PY has no torch that sees a CUDA GPU; nothing was run"
  exit 2
fi

# (b) the environment: fairseq and the packages it imports
need="import fairseq, fairseq.data.data_utils_fast, fairseq.data.token_block_utils_fast, omegaconf, hydra, bitarray"
if "$PY" -c "$need" 2>/dev/null; then
  log "env: fairseq installed in $PY"
elif [ -d "$ROOT/.gpu_site" ]; then
  export PYTHONPATH="$ROOT/.gpu_site:$PYTHONPATH"
  log "env: fairseq from the carried .gpu_site (scripts/gpu_prepare.sh)"
else
  log "env: fairseq missing and no .gpu_site; trying pip (offline machines fail fast)"
  timeout 300 "$PY" -m pip install -q --retries 0 --timeout 10 --no-build-isolation -e "$ROOT" 2>&1 | tail -5 | tee -a "$RES/summary.txt"
fi
if ! "$PY" -c "$need; import fairseq_stablemoe; print('fairseq', fairseq.__version__, fairseq.__file__)" 2>&1 | tee -a "$RES/versions.txt"; then
  log "STOP: fairseq does not import in $PY. On a machine with PyPI run 'bash scripts/gpu_prepare.sh' (builds .gpu_site/, ~1 min), then call this script with carry=[\".gpu_site\"]"
  exit 3
fi
for p in pytest numpy; do "$PY" -c "import $p" 2>/dev/null || log "warning: $PY lacks $p"; done

# (c) the CUDA tests
step "pytest tests/test_cuda.py" 330 "$RES/test_cuda.txt" "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py

# (d) the layer against a dense FFN (same sublayers), ratios side by side, the device in the header
B=(benchmarks/moe_layer.py --device cuda --cases stage1 stage2 inference --warmup 3 --markdown "$RES/performance_gpu.md")
step "bench paper shape bf16 (auto backend)" 100 "$RES/bench_paper_bf16.txt" \
  "$PY" "${B[@]}" --dtype bf16 --sublayers 3 --dim 768 --ffn 3072 --tokens 16384 --experts 1 4 16 --repeats 15
step "bench paper shape bf16 (loop backend)" 70 "$RES/bench_paper_bf16_loop.txt" \
  "$PY" "${B[@]}" --dtype bf16 --sublayers 3 --dim 768 --ffn 3072 --tokens 16384 --experts 4 16 --repeats 10 --backend loop
step "bench small-expert shape bf16" 60 "$RES/bench_small_bf16.txt" \
  "$PY" "${B[@]}" --dtype bf16 --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 15
step "bench small-expert shape fp32" 60 "$RES/bench_small_fp32.txt" \
  "$PY" "${B[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 15
log "done in $((SECONDS - START))s; results in $RES"
grep -h -E "passed|failed|error" "$RES/test_cuda.txt" | tail -1 | sed 's/^/[gpu_check] tests: /'
grep -h -E "^# torch|^case=" "$RES"/bench_*.txt | cut -c1-200

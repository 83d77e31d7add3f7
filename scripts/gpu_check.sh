#!/usr/bin/env bash
# Every GPU check in one command (at most 540 s; each part's time is printed), on a machine with one
# CUDA GPU:
#   (a) nvidia-smi, Python, torch and CUDA versions;
#   (b) the environment: fairseq as installed, else .gpu_site/ beside the repository (built on a
#       machine with PyPI by scripts/gpu_prepare.sh), else a pip install; fairseq's libbase compiled
#       against this torch when it is missing (BASE layers, --stage1-assignment balanced);
#   (c) pytest tests/test_cuda.py: the layer and its backends on CUDA against CPU and the loop, one
#       host sync per forward (fp32, and bf16 on the grouped path), fairseq-train on one GPU in
#       fp32/fp16/amp (fairseq's --bf16 implies --tpu), BASE layers and the balanced stage 1;
#   (d) 2 processes on the one GPU with a `cuda:gloo` process group, which refuses host tensors as
#       NCCL does (NCCL cannot put two processes on one GPU): tests/test_distributed_eval.py (its
#       2-process cases, not the slow ones) with STABLEMOE_TEST_CUDA_GLOO=1: 2-process training across the stage boundary
#       with the experts split, fairseq-eval-lm, -validate, -generate and -interactive from the
#       per-rank files against one process on the consolidated file, and the consolidation;
#   (e) benchmarks/moe_layer.py on CUDA: the layer against a dense FFN, in bf16 at the paper's base
#       expert shape (d=768, f=3072, 3 sublayers, 16384 tokens, N_local 1 4 16) and in fp32 at the
#       small-expert shape (T=4096, d=256, f=1024, N=8 32).
# Results go to $OUT if set, else ./gpu_check_out: summary.txt (what ran, exit codes, seconds),
# versions.txt, test_cuda.txt, test_two_processes.txt, bench_*.txt, and performance_gpu.md (the
# benchmarks' tables, as blocks for docs/performance.md). Every benchmark file names the GPU.
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
  local name=$1 limit=$2 file=$3 t0=$SECONDS; shift 3
  log "$name: start (limit ${limit}s) -> $(basename "$file")"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$file") 2>&1
  local rc=$?
  log "$name: exit $rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)') in $((SECONDS - t0))s"
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
  log "env: fairseq from .gpu_site (scripts/gpu_prepare.sh)"
else
  log "env: fairseq missing and no .gpu_site; trying pip (offline machines fail fast)"
  timeout 300 "$PY" -m pip install -q --retries 0 --timeout 10 --no-build-isolation -e "$ROOT" 2>&1 | tail -5 | tee -a "$RES/summary.txt"
fi
if ! "$PY" -c "$need; import fairseq_stablemoe; print('fairseq', fairseq.__version__, fairseq.__file__)" 2>&1 | tee -a "$RES/versions.txt"; then
  log "STOP: fairseq does not import in $PY. On a machine with PyPI run 'bash scripts/gpu_prepare.sh' (builds .gpu_site/, ~1 min) and copy .gpu_site/ beside the repository on this machine"
  exit 3
fi
for p in pytest numpy; do "$PY" -c "import $p" 2>/dev/null || log "warning: $PY lacks $p"; done
LIBBASE_SRC="$ROOT/.gpu_site/fairseq/clib/libbase/balanced_assignment.cpp"
if ! "$PY" -c "from fairseq import libbase" 2>/dev/null && [ -f "$LIBBASE_SRC" ]; then
  log "libbase: compiling fairseq's balanced assignment against this torch"
  (cd "$ROOT/.gpu_site" && timeout 150 "$PY" - <<'EOF'
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(name="fairseq_libbase", ext_modules=[CppExtension("fairseq.libbase", ["fairseq/clib/libbase/balanced_assignment.cpp"])],
      cmdclass={"build_ext": BuildExtension}, script_args=["build_ext", "--inplace"])
EOF
  ) > "$RES/libbase_build.txt" 2>&1
  "$PY" -c "from fairseq import libbase; print('libbase', libbase.__file__)" 2>&1 | tail -1 | tee -a "$RES/summary.txt"
  log "libbase: done"
fi

# (c) the CUDA tests
step "pytest tests/test_cuda.py" 160 "$RES/test_cuda.txt" "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py

# (d) 2 processes on the one GPU, a cuda:gloo process group (host tensors refused, as under NCCL)
# (the 2-process cases with 1 batch; 4 processes and more batches are left to the CPU suite), every
# command in a fresh interpreter and torchrun itself (STABLEMOE_TEST_COLD=1), as on a user's machine
step "2 processes, cuda:gloo: tests/test_distributed_eval.py" 220 "$RES/test_two_processes.txt" \
  env STABLEMOE_TEST_CUDA_GLOO=1 STABLEMOE_TEST_COLD=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short \
  -k "not 4- and not 2-2 and not 2-3" tests/test_distributed_eval.py

# (e) the layer against a dense FFN (same sublayers), ratios side by side, the device in the header
B=(benchmarks/moe_layer.py --device cuda --cases stage1 stage2 inference --warmup 3 --markdown "$RES/performance_gpu.md")
step "bench paper shape bf16 (auto backend)" 60 "$RES/bench_paper_bf16.txt" \
  "$PY" "${B[@]}" --dtype bf16 --sublayers 3 --dim 768 --ffn 3072 --tokens 16384 --experts 1 4 16 --repeats 10
step "bench small-expert shape fp32" 30 "$RES/bench_small_fp32.txt" \
  "$PY" "${B[@]}" --tokens 4096 --dim 256 --ffn 1024 --experts 8 32 --repeats 10
log "done in $((SECONDS - START))s; results in $RES"
for f in test_cuda test_two_processes; do
  grep -h -E "passed|failed|error" "$RES/$f.txt" | tail -1 | sed "s/^/[gpu_check] $f: /"
done
grep -h -E "^# torch|^case=" "$RES"/bench_*.txt | cut -c1-200

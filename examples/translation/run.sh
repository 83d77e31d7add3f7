#!/usr/bin/env bash
# StableMoE for translation on a small parallel corpus built offline:
# English (Shakespeare) -> Pig Latin, joint sentencepiece, fairseq-preprocess,
# stablemoe_transformer across the stage boundary, fairseq-generate with beam 4
# and sacrebleu on the first and the last checkpoint.
#
#   bash examples/translation/run.sh            (after scripts/demo.sh has prepared the text)
#   TEXT_DIR=... WORK=... MAX_UPDATE=... bash examples/translation/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TEXT_DIR="${TEXT_DIR:-$ROOT/runs/shakespeare/text}"
WORK="${WORK:-$ROOT/runs/translation}"
MAX_UPDATE="${MAX_UPDATE:-1500}"
TWO_STAGE="${TWO_STAGE:-400}"
[ -f "$TEXT_DIR/train.txt" ] || { echo "no $TEXT_DIR/train.txt: run scripts/demo.sh first (or set TEXT_DIR)" >&2; exit 1; }
mkdir -p "$WORK"

echo "[translation] building the parallel corpus"
"$PY" "$ROOT/examples/translation/make_pig_latin.py" "$TEXT_DIR" "$WORK/raw" --max-lines 30000

echo "[translation] joint sentencepiece model"
"$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import sentencepiece as spm
work = Path(sys.argv[1])
raw = work / "raw"
if not (work / "spm.model").exists():
    spm.SentencePieceTrainer.train(
        input=f"{raw}/train.en,{raw}/train.pig", model_prefix=str(work / "spm"), vocab_size=4000,
        character_coverage=1.0, model_type="unigram", input_sentence_size=200000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2,
    )
sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
(work / "spm_text").mkdir(exist_ok=True)
for split in ("train", "valid", "test"):
    for lang in ("en", "pig"):
        lines = (raw / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
        pieces = [" ".join(sp.encode(l, out_type=str)) for l in lines]
        (work / "spm_text" / f"{split}.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")
PYEOF

echo "[translation] fairseq-preprocess"
if [ ! -f "$WORK/data-bin/dict.en.txt" ]; then
  "$VENV/bin/fairseq-preprocess" --source-lang en --target-lang pig \
    --trainpref "$WORK/spm_text/train" --validpref "$WORK/spm_text/valid" --testpref "$WORK/spm_text/test" \
    --destdir "$WORK/data-bin" --joined-dictionary --workers 2 > "$WORK/preprocess.log"
fi

echo "[translation] training stablemoe_transformer ($MAX_UPDATE updates, stage 2 from $TWO_STAGE)"
"$VENV/bin/fairseq-train" "$WORK/data-bin" --user-dir "$ROOT/fairseq_stablemoe" \
  --task translation --arch stablemoe_transformer --share-all-embeddings \
  --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 192 --decoder-embed-dim 192 \
  --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-attention-heads 4 --decoder-attention-heads 4 \
  --num-experts 4 --encoder-moe-layers 1 --decoder-moe-layers 1 --two-stage-updates "$TWO_STAGE" \
  --criterion stablemoe --label-smoothing 0.1 --optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 \
  --lr-scheduler inverse_sqrt --warmup-updates 200 --clip-norm 1.0 --dropout 0.1 --max-tokens 4096 \
  --max-update "$MAX_UPDATE" --cpu --num-workers 0 --save-dir "$WORK/checkpoints" \
  --save-interval-updates 250 --keep-interval-updates -1 --no-epoch-checkpoints \
  --log-format simple --log-interval 50

FIRST=$(ls "$WORK"/checkpoints/checkpoint_*_*.pt | sort -t_ -k3 -n | head -1)
for CKPT in "$FIRST" "$WORK/checkpoints/checkpoint_last.pt"; do
  echo "[translation] fairseq-generate --beam 4 on test with $(basename "$CKPT")"
  "$VENV/bin/fairseq-generate" "$WORK/data-bin" --user-dir "$ROOT/fairseq_stablemoe" --path "$CKPT" \
    --gen-subset test --beam 4 --cpu --max-tokens 8000 --remove-bpe sentencepiece --scoring sacrebleu \
    2>/dev/null | tail -1
done

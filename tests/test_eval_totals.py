"""eval_totals.merge_scorer on 2 gloo processes: each process scores its share of the sentences (one
process none), and after the merge every process's score is that of one scorer fed every sentence."""

import datetime
import os
import random

import torch
import torch.distributed as dist
from corpus import run_processes

W = 2
#: the sentences each process scores: one process has none (a shard without a batch), or both some
SPLITS = {"one_empty": {0: range(0, 12), 1: range(0, 0)}, "both": {0: range(0, 7), 1: range(7, 12)}}


def sentences():
    rng = random.Random(5)
    out = []
    for _ in range(12):
        ref = [rng.randrange(4, 30) for _ in range(rng.randint(4, 10))]
        hyp = [t if rng.random() < 0.7 else rng.randrange(4, 30) for t in ref]
        out.append((ref, hyp))
    return out


def build(kind: str):
    from fairseq.scoring import bleu, wer

    if kind == "bleu":
        return bleu.Scorer(bleu.BleuConfig())
    if kind == "sacrebleu":
        return bleu.SacrebleuScorer(bleu.SacrebleuConfig())
    return wer.WerScorer(wer.WerScorerConfig())


def feed(scorer, kind: str, pairs) -> None:
    for ref, hyp in pairs:
        if kind == "bleu":
            scorer.add(torch.tensor(ref, dtype=torch.int), torch.tensor(hyp, dtype=torch.int))
        else:
            scorer.add_string(" ".join(f"w{t}" for t in ref), " ".join(f"w{t}" for t in hyp))


def kinds():
    """The scorers to check: fairseq's BLEU (summed counts), sacreBLEU (gathered sentences), WER if installed."""
    try:
        import editdistance  # noqa: F401

        return ["bleu", "sacrebleu", "wer"]
    except ImportError:
        return ["bleu", "sacrebleu"]


def worker(rank: int, port: int, queue) -> None:
    try:
        from fairseq_stablemoe.fairseq_hooks.eval_totals import merge_scorer

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=60))
        pairs = sentences()
        results = {}
        for name, split in SPLITS.items():
            for kind in kinds():
                scorer = build(kind)
                feed(scorer, kind, [pairs[i] for i in split[rank]])
                merge_scorer(scorer, W)
                results[name, kind] = scorer.result_string()
        queue.put((rank, results))
        dist.destroy_process_group()
    except Exception as e:  # report instead of hanging the other process
        queue.put((rank, f"exception: {e!r}"))
        raise


def test_merged_score_is_the_one_process_score():
    want = {}
    for kind in kinds():
        one = build(kind)
        feed(one, kind, sentences())
        want[kind] = one.result_string()
        assert " 0.00" not in want[kind].split(",")[0]  # a real score, not an empty one
    got = run_processes(worker, W, timeout=120)
    for rank in range(W):
        assert isinstance(got[rank], dict), got[rank]
        for (name, kind), score in got[rank].items():
            assert score == want[kind], (rank, name, kind)
        assert len(got[rank]) == len(SPLITS) * len(kinds())

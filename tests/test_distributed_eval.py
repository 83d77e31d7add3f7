"""fairseq-eval-lm, -generate, -validate, -interactive and fairseq-train's validation under torchrun
straight from an expert-parallel run's per-rank files (2 and 4 gloo processes), against one process
on the consolidated checkpoint.

The multi-process runs go through ``python -m fairseq_stablemoe.launch <tool>`` (the distributed
flags added), or fairseq's own tool with ``--user-dir`` (the plugin adopts torchrun's job); the
references are fairseq's own tools (``python -m fairseq_cli.<tool>``) on the file that
``stablemoe-consolidate`` writes. The test split is cut into 1, 2 or 3 batches, so that some
processes hold none, or fewer than others (eval-lm's filler batch), and beam search ends at
different steps: those logs must report forwards on a padding token, or the lockstep was not
exercised; the summary lines must count the whole split.

``STABLEMOE_TEST_CUDA_GLOO=1`` runs the same tests on a CUDA GPU (``scripts/gpu_check.sh``): every
process on device 0, the process group ``cuda:gloo``, which refuses host tensors as NCCL does.
"""

import math
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import warm
from corpus import binarise, free_port, markov_lines, run_checked

#: where the processes run: CPU processes over gloo, or (on a GPU) a group that takes only CUDA tensors
DEVICE = ["--distributed-backend", "cuda:gloo"] if os.environ.get("STABLEMOE_TEST_CUDA_GLOO") == "1" else ["--cpu"]

LM = [
    "--task",
    "language_modeling",
    "--arch",
    "stablemoe_lm",
    "--criterion",
    "stablemoe",
    "--decoder-layers",
    "2",
    "--decoder-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "64",
    "--decoder-attention-heads",
    "2",
    "--num-experts",
    "4",
    "--tokens-per-sample",
    "32",
    "--two-stage-updates",
    "3",
    "--optimizer",
    "adam",
    "--lr",
    "0.005",
    "--dropout",
    "0",
    "--max-tokens",
    "256",
    "--required-batch-size-multiple",
    "1",
    "--max-update",
    "6",
    "--save-interval-updates",
    "3",
    "--no-epoch-checkpoints",
    "--max-tokens-valid",  # the valid split in one batch: fairseq-train's validation with a process that has none
    "4096",
    "--batch-size-valid",
    "64",
    "--seed",
    "3",
    "--num-workers",
    "0",
    *DEVICE,
    "--ddp-backend",
    "legacy_ddp",
]
MT = [
    "--task",
    "translation",
    "--arch",
    "stablemoe_transformer",
    "--encoder-layers",
    "2",
    "--decoder-layers",
    "2",
    "--encoder-embed-dim",
    "32",
    "--decoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--decoder-ffn-embed-dim",
    "64",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
    "--criterion",
    "stablemoe",
    "--num-experts",
    "4",
    "--two-stage-updates",
    "10",
    "--optimizer",
    "adam",
    "--lr",
    "0.005",
    "--max-tokens",
    "1024",
    "--max-update",
    "30",
    *DEVICE,
    "--ddp-backend",
    "legacy_ddp",
    "--disable-validation",
    "--no-epoch-checkpoints",
    "--seed",
    "2",
    "--num-workers",
    "0",
]
USER_DIR = str(Path(__file__).resolve().parents[1] / "fairseq_stablemoe")
N_TEST_MT = 37


def run(cmd, ok=True):
    return run_checked(cmd, ok, env={"STABLEMOE_LOCKSTEP_TIMEOUT": "120"})


def on_two(tool, *args, ok=True):
    """``tool`` (train, eval-lm, generate, validate) on 2 gloo processes from torchrun."""
    return on_w(2, tool, *args, ok=ok)


def on_w(world, tool, *args, ok=True, plain=False):
    """``tool`` on ``world`` gloo processes from torchrun: through ``fairseq_stablemoe.launch`` (which adds
    the distributed flags), or (``plain``) fairseq's own tool with ``--user-dir`` (the plugin adopts the job)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    torchrun += ["--master_port", str(free_port())]
    if plain:
        return run([*torchrun, "-m", f"fairseq_cli.{tool.replace('-', '_')}", *map(str, args), "--user-dir", USER_DIR])
    return run([*torchrun, "-m", "fairseq_stablemoe.launch", tool, *map(str, args)], ok=ok)


def on_one(module, *args, ok=True):
    """fairseq's own tool, one process, the plugin as --user-dir."""
    return run([sys.executable, "-m", f"fairseq_cli.{module}", *map(str, args), "--user-dir", USER_DIR], ok=ok)


_references = {}


def reference(module, *args):
    """:func:`on_one` run once per command line: the W = 2 and W = 4 cases compare with the same run."""
    key = (module, *map(str, args))
    if key not in _references:
        _references[key] = on_one(module, *args)
    return _references[key]


def consolidate(*args):
    return run([sys.executable, "-m", "fairseq_stablemoe.cli.consolidate", *map(str, args)])


def padding_forwards(output: str) -> int:
    m = re.search(r"(\d+) forwards on a padding token kept the processes in step", output)
    assert m, output[-3000:]
    return int(m.group(1))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_eval_lm")
    # words w100 ... w119 as two subword_nmt pieces, "w1@@ 00": eval-lm's --post-process merges them
    lines = [
        " ".join(f"w1@@ {w[2:]}" if int(w[1:]) >= 100 else w for w in line.split())
        for line in markov_lines(700, 120, seed=0)
    ]
    data = binarise(tmp, {"train": lines[:600], "valid": lines[600:650], "test": lines[650:]})
    log = on_two("train", data, *LM, "--save-dir", tmp / "ckpt")
    (tmp / "train.log").write_text(log)
    consolidate(tmp / "ckpt" / "checkpoint_last.pt", "-o", f"{tmp / 'one'}/")
    return data, tmp


def per_rank_files(ckpt_dir, one_file, world, tmp):
    """The run's own per-rank files on 2 processes, files written for ``world`` processes otherwise."""
    if world == 2:
        return ckpt_dir / "checkpoint_last.pt"
    out = tmp / f"shards{world}"
    if not out.exists():
        consolidate(one_file, "--shards", world, "-o", f"{out}/")
    return out / "checkpoint_last.pt"


def eval_lm_blocks(data, tokens_per_sample=32, split="test"):
    """Blocks of a split as language_modeling cuts it (break mode none: every ``tokens_per_sample`` tokens)."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(str(data / split), None)
    return math.ceil(int(dataset.sizes.sum()) / tokens_per_sample)


@pytest.mark.parametrize(
    "world, batches",
    [
        (2, 1),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(2, 3, marks=pytest.mark.slow),
        pytest.param(4, 1, marks=pytest.mark.slow),
        pytest.param(4, 2, marks=pytest.mark.slow),
        pytest.param(4, 3, marks=pytest.mark.slow),
    ],
)
def test_eval_lm_per_rank_files_give_the_consolidated_perplexity(lm, world, batches):
    """Processes with no batch (batches < W) or fewer batches than others: the whole split's perplexity."""
    data, tmp = lm
    blocks = eval_lm_blocks(data)
    per_batch = math.ceil(blocks / batches)
    assert math.ceil(blocks / per_batch) == batches  # the split is `batches` batches
    common = ["--tokens-per-sample", "32", "--batch-size", per_batch, "--max-tokens", "4096", "--gen-subset", "test"]
    common += DEVICE
    path = per_rank_files(tmp / "ckpt", tmp / "one" / "checkpoint_last.pt", world, tmp)
    # 2 batches on 4 processes with fairseq's own fairseq-eval-lm under torchrun, the others through the launcher
    many = on_w(world, "eval-lm", data, "--path", path, *common, plain=(world, batches) == (4, 2))
    one = reference("eval_lm", data, "--path", tmp / "one" / "checkpoint_last.pt", *common)

    m = re.search(
        rf"{world} processes scored (\d+) tokens in all: loss \(base 2\) ([0-9.]+), perplexity ([0-9.]+)", many
    )
    assert m, many[-3000:]
    tokens_w, loss_w, ppl_w = int(m.group(1)), float(m.group(2)), float(m.group(3))
    tokens1 = int(re.search(r"Evaluated ([0-9,]+) tokens", one).group(1).replace(",", ""))
    m1 = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", one)
    loss1, ppl1 = float(m1.group(1)), float(m1.group(2))
    assert tokens_w == tokens1  # every token scored once: none dropped, none twice
    assert abs(loss_w - loss1) <= 6e-5  # fairseq prints 4 decimals
    assert abs(ppl_w - ppl1) <= 1e-3 * ppl1
    # fairseq's own lines on the W-process run report the whole split too
    assert f"Loss (base 2): {loss_w:.4f}, Perplexity: {ppl_w:.2f}" in many
    assert f"Evaluated {tokens1:,} tokens" in many
    if batches % world:
        assert padding_forwards(many) > 0  # a process with fewer batches served the others' forwards


def _gather_logs_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """fairseq's ``all_gather_list`` as fairseq-validate calls it, with the CUDA branch forced on CPU."""
    import datetime
    import os
    import pickle

    import torch
    import torch.distributed as dist

    torch.cuda.is_available = lambda: True  # fairseq's version: its CUDA buffer, made on the host here
    torch.cuda.ByteTensor = lambda n: torch.empty(n, dtype=torch.uint8)
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    from fairseq.distributed import utils as distributed_utils

    import fairseq_stablemoe  # noqa: F401  (wraps all_gather_list)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    # 8 batches of a logging output the size of the stablemoe criterion's (~3.7 KB pickled each)
    logs = [
        {f"moe{j}_stat{k}": torch.tensor(float(rank * 1000 + b * 10 + j)) for j in range(4) for k in range(12)}
        for b in range(8)
    ]
    assert len(pickle.dumps(logs)) > 16384  # over fairseq's buffer
    try:
        got = distributed_utils.all_gather_list(logs)
        result = [[{k: float(v) for k, v in log.items()} for log in part] for part in got]
    except ValueError as e:
        result = str(e)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(repr(result))


def test_validate_gathers_logs_of_any_size_with_the_cuda_branch_forced(tmp_path):
    """fairseq-validate gathers every batch's logging output with ``all_gather_list``; fairseq's own
    (taken whenever CUDA is available) fits 16 KB, about 4 batches of the stablemoe criterion's."""
    import torch.multiprocessing as mp

    start_method = warm.context().get_start_method()
    mp.start_processes(_gather_logs_worker, (2, free_port(), str(tmp_path)), nprocs=2, start_method=start_method)
    for rank in range(2):
        got = eval((tmp_path / f"rank{rank}.txt").read_text())
        assert isinstance(got, list), got  # not fairseq's "encoded data size ... exceeds max_size"
        assert len(got) == 2 and all(len(part) == 8 for part in got)
        for sender, part in enumerate(got):
            assert [log["moe3_stat11"] for log in part] == [sender * 1000 + b * 10 + 3 for b in range(8)]


def word_stats(out: str):
    """``{word: (count, log_prob, is_bpe, next_word_prob, with_next)}`` of eval-lm's --output-word-stats."""
    found = {}
    for m in re.finditer(r"fairseq_cli\.eval_lm(?: \| |:)(\S+)\t(\d+)\t(\S+)\t(True|False)\t(\S+)\t(\d+)$", out, re.M):
        word, count, log_prob, is_bpe, next_prob, with_next = m.groups()
        next_prob = float(re.sub(r"^tensor\((.*)\)$", r"\1", next_prob))  # fairseq sums 0-dim tensors there
        assert word not in found, word
        found[word] = (int(count), float(log_prob), is_bpe == "True", next_prob, int(with_next))
    return found


def test_eval_lm_word_stats_of_bpe_pieces_match_one_process(lm):
    """--post-process "@@ " --output-word-stats: the pieces' scores merged once (fairseq's own loop,
    after the plugin's tally has read them), and the statistics of the whole split on 2 processes."""
    data, tmp = lm
    common = ["--tokens-per-sample", "32", "--max-tokens", "160", "--gen-subset", "test", *DEVICE]
    # "@@ ": fairseq's eval_lm takes "subword_nmt" too, but then looks for pieces ending in "subword_nmt"
    common += ["--post-process", "@@ ", "--output-word-stats"]
    two = on_two("eval-lm", data, "--path", tmp / "ckpt" / "checkpoint_last.pt", *common)
    one = on_one("eval_lm", data, "--path", tmp / "one" / "checkpoint_last.pt", *common)
    s1, s2 = word_stats(one), word_stats(two)
    assert any(v[2] for v in s1.values()) and any(not v[2] for v in s1.values()), "no merged pieces"
    assert s2.keys() == s1.keys()
    for word, (count, log_prob, is_bpe, next_prob, with_next) in s1.items():
        got = s2[word]
        assert (got[0], got[2], got[4]) == (count, is_bpe, with_next), word
        assert got[1] == pytest.approx(log_prob, rel=1e-4, abs=1e-3), word
        assert got[3] == pytest.approx(next_prob, rel=1e-4, abs=1e-3), word
    ppl = [float(re.findall(r"Perplexity: ([0-9.]+)", out)[-1]) for out in (one, two)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


def valid_loss(out, subset):
    """The last validation loss fairseq prints for ``subset`` (and its words per batch)."""
    found = re.findall(rf"valid on '{subset}' subset \| loss ([0-9.]+) .*?\| wpb ([0-9.]+) \| bsz", out)
    assert found, out[-3000:]
    return float(found[-1][0]), float(found[-1][1])


@pytest.mark.parametrize("batching", ["uneven", pytest.param("one_batch", marks=pytest.mark.slow)])
def test_validate_per_rank_files_match_the_consolidated_loss(lm, batching):
    """An odd number of batches, 8 or more per process (one process gets a filler; fairseq-validate gathers
    every batch's logging output), or the whole split in one batch (one process gets none)."""
    data, tmp = lm
    # uneven: one block per batch, the block length chosen so that the split has an odd number of blocks
    length = 32 if batching == "one_batch" else next(t for t in range(32, 16, -1) if eval_lm_blocks(data, t) % 2)
    common = ["--task", "language_modeling", "--tokens-per-sample", str(length), "--valid-subset", "test", *DEVICE]
    common += ["--criterion", "cross_entropy", "--required-batch-size-multiple", "1"]
    if batching == "uneven":
        assert eval_lm_blocks(data, length) >= 17
        common += ["--max-tokens", "4096", "--batch-size", "1"]
    else:
        common += ["--max-tokens", "4096", "--batch-size", "64"]
    two = on_two("validate", data, "--path", tmp / "ckpt" / "checkpoint_last.pt", *common)
    one = on_one("validate", data, "--path", tmp / "one" / "checkpoint_last.pt", *common)
    if batching == "one_batch":
        assert eval_lm_blocks(data) <= 64  # the split is one batch
    assert valid_loss(two, "test") == pytest.approx(valid_loss(one, "test"), abs=1.5e-3)
    assert padding_forwards(two) > 0  # the process with the filler batch, or with none, ran none of its own


def test_train_validation_with_a_process_without_valid_batch(lm):
    """fairseq-train on 2 processes validated a valid split of one batch at every save: its last valid loss
    is that of one process on the consolidated last checkpoint."""
    data, tmp = lm
    log = (tmp / "train.log").read_text()
    common = ["--task", "language_modeling", "--tokens-per-sample", "32", "--valid-subset", "valid", *DEVICE]
    common += ["--max-tokens", "4096", "--batch-size", "64", "--required-batch-size-multiple", "1"]
    one = on_one("validate", data, "--path", tmp / "one" / "checkpoint_last.pt", *common)
    assert eval_lm_blocks(data, split="valid") <= 64  # the valid split is one batch (--batch-size-valid 64)
    assert len(re.findall(r"valid on 'valid' subset", log)) >= 2  # at update 3 and at the end
    assert valid_loss(log, "valid") == pytest.approx(valid_loss(one, "valid"), abs=1.5e-3)


def test_wrong_files_stop_before_the_first_batch(lm):
    data, tmp = lm
    common = ["--tokens-per-sample", "32", "--max-tokens", "160", "--gen-subset", "test", *DEVICE]
    # one process on per-rank files: consolidate first
    out = on_one("eval_lm", data, "--path", tmp / "ckpt" / "checkpoint_last.pt", *common, ok=False)
    assert f"stablemoe-consolidate {tmp / 'ckpt' / 'checkpoint_last.pt'}" in out
    # files written for 4 processes, run on 2: the command that writes files for 2
    four = tmp / "four"
    consolidate(tmp / "one" / "checkpoint_last.pt", "--shards", "4", "-o", f"{four}/")
    out = on_two("eval-lm", data, "--path", four / "checkpoint_last.pt", *common, ok=False)
    assert f"stablemoe-consolidate {four / 'checkpoint_last.pt'} --shards 2" in out
    # the one-process file on 2 processes: split it
    out = on_two("eval-lm", data, "--path", tmp / "one" / "checkpoint_last.pt", *common, ok=False)
    assert "--shards 2" in out
    # a missing rank file
    broken = tmp / "broken"
    shutil.copytree(tmp / "ckpt", broken)
    (broken / "checkpoint_last-rank1-of2.pt").unlink()
    out = on_two("eval-lm", data, "--path", broken / "checkpoint_last.pt", *common, ok=False)
    assert "missing per-rank checkpoint file(s)" in out and "checkpoint_last-rank1-of2.pt" in out
    # rank files of different saves (update 3 for rank 1, update 6 for rank 0)
    shutil.copy(broken / "checkpoint_1_3-rank1-of2.pt", broken / "checkpoint_last-rank1-of2.pt")
    out = on_two("eval-lm", data, "--path", broken / "checkpoint_last.pt", *common, ok=False)
    assert "are from different saves" in out
    outs = [out]
    # rank 1's file cut short: every process stops, naming it, what it is, and the last good save beside it
    whole = (tmp / "ckpt" / "checkpoint_last-rank1-of2.pt").read_bytes()
    (broken / "checkpoint_last-rank1-of2.pt").write_bytes(whole[: len(whole) // 2])
    out = on_two("eval-lm", data, "--path", broken / "checkpoint_last.pt", *common, ok=False)
    bad = broken / "checkpoint_last-rank1-of2.pt"
    assert f"checkpoint {bad} cannot be read: it is truncated: a zip archive" in out, out[-3000:]
    assert f"The last readable checkpoint beside it is {broken / 'checkpoint_1_6-rank1-of2.pt'} (update 6)" in out
    assert "weights_only" not in out
    outs.append(out)
    for bad in outs:
        assert "Evaluated" not in bad  # stopped before the first batch


def _sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w, words = rng.randrange(60), []
        for _ in range(rng.randint(3, 12)):
            words.append(f"w{w}")
            w = (w * 5 + rng.randint(0, 2)) % 60
        out.append(words)
    return out


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_eval_mt")
    for split, n, seed in (("train", 800, 0), ("valid", 40, 1), ("test", N_TEST_MT, 2)):
        sents = _sentences(n, seed)
        (tmp / f"{split}.src").write_text("\n".join(" ".join(s) for s in sents) + "\n")
        (tmp / f"{split}.tgt").write_text("\n".join(" ".join("v" + w[1:] for w in reversed(s)) for s in sents) + "\n")
    run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            tmp / "train",
            "--validpref",
            tmp / "valid",
            "--testpref",
            tmp / "test",
            "--destdir",
            tmp / "bin",
            "--workers",
            "1",
        ]
    )
    on_two("train", tmp / "bin", *MT, "--save-dir", tmp / "ckpt")
    consolidate(tmp / "ckpt" / "checkpoint_last.pt", "-o", f"{tmp / 'one'}/")
    return tmp


def hypotheses(text: str):
    """``{sentence id: (hypothesis, score)}`` from fairseq-generate's H- lines."""
    found = {}
    for line in text.splitlines():
        if line.startswith("H-"):
            sid, score, hypo = line.split("\t")
            assert int(sid[2:]) not in found, f"sentence {sid} printed twice"
            found[int(sid[2:])] = (hypo, float(score))
    return found


def bleu_line(text: str) -> str:
    m = re.search(r"^Generate test with beam=4: .*$", text, re.M)
    assert m, text[-3000:]
    return m.group(0)


@pytest.mark.parametrize(
    "world, batches",
    [
        (2, 1),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(2, 3, marks=pytest.mark.slow),
        pytest.param(4, 1, marks=pytest.mark.slow),
        pytest.param(4, 2, marks=pytest.mark.slow),
        pytest.param(4, 3, marks=pytest.mark.slow),
    ],
)
def test_generate_per_rank_files_give_the_consolidated_hypotheses(mt, world, batches):
    """Processes with no batch (batches < W) or fewer batches than others: every sentence once, the
    consolidated file's hypotheses and scores, and summary lines that count the whole split."""
    per_batch = math.ceil(N_TEST_MT / batches)
    assert math.ceil(N_TEST_MT / per_batch) == batches  # (the split's sentences fit 4096 tokens)
    common = ["--beam", "4", *DEVICE, "--max-tokens", "4096", "--batch-size", per_batch, "--gen-subset", "test"]
    common += ["--required-batch-size-multiple", "1"]
    path = per_rank_files(mt / "ckpt", mt / "one" / "checkpoint_last.pt", world, mt)
    res_w, res_1 = mt / f"res{world}_{batches}", mt / f"res1_{batches}"
    # 1 batch on 2 processes with fairseq's own fairseq-generate under torchrun, the others through the launcher
    plain = (world, batches) == (2, 1)
    many = on_w(world, "generate", mt / "bin", "--path", path, *common, "--results-path", res_w, plain=plain)
    reference("generate", mt / "bin", "--path", mt / "one" / "checkpoint_last.pt", *common, "--results-path", res_1)

    files = sorted(res_w.iterdir())
    assert [f.name for f in files] == [f"generate-test-rank{r}-of{world}.txt" for r in range(world)]
    per_rank = [hypotheses(f.read_text()) for f in files]
    assert sum(1 for h in per_rank if h) == min(batches, world)  # batch i on process i mod W; the others none
    got = {}
    for h in per_rank:
        assert not set(got) & set(h)  # each sentence on one process only
        got.update(h)
    one = (res_1 / "generate-test.txt").read_text()
    want = hypotheses(one)
    assert sorted(want) == list(range(N_TEST_MT))
    assert sorted(got) == sorted(want)
    for sid in want:
        assert got[sid][0] == want[sid][0], f"sentence {sid}"
        assert got[sid][1] == pytest.approx(want[sid][1], rel=1e-5, abs=1e-6), f"sentence {sid}"
    # the summary: totals over all processes, on every process (the BLEU of the whole split)
    for f in files:
        assert bleu_line(f.read_text()) == bleu_line(one)
    assert re.search(rf"Translated {N_TEST_MT} sentences \([0-9,]+ tokens\) in .* on {world} processes", many), many[
        -3000:
    ]
    if batches < world:
        assert padding_forwards(many) > 0  # the processes without a batch served the others' forwards


def test_interactive_per_rank_files_print_each_input_once(mt):
    src = (mt / "test.src").read_text().splitlines()[:5]
    (mt / "five.src").write_text("\n".join(src) + "\n")
    common = [
        "--beam",
        "4",
        *DEVICE,
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--input",
        mt / "five.src",
        "--buffer-size",
        "2",
        "--max-tokens",
        "100",
    ]
    two = hypotheses(on_two("interactive", mt / "bin", "--path", mt / "ckpt" / "checkpoint_last.pt", *common))
    one = hypotheses(on_one("interactive", mt / "bin", "--path", mt / "one" / "checkpoint_last.pt", *common))
    assert sorted(two) == sorted(one) == list(range(5))
    for sid in one:
        assert two[sid][0] == one[sid][0]
        assert two[sid][1] == pytest.approx(one[sid][1], rel=1e-5, abs=1e-6)


def test_lockstep_waits_less_than_the_process_group(monkeypatch):
    """The lockstep's own timeout (and its message naming the likely cause) comes before the process
    group's: NCCL's default is 600 s, gloo's 1800 s; STABLEMOE_LOCKSTEP_TIMEOUT overrides it."""
    from fairseq_stablemoe.fairseq_hooks import eval_lockstep

    monkeypatch.delenv(eval_lockstep.TIMEOUT_ENV, raising=False)
    for group_timeout in (600.0, 1800.0, 100.0):
        monkeypatch.setattr(eval_lockstep, "_process_group_timeout", lambda t=group_timeout: t)
        assert eval_lockstep._timeout().total_seconds() < group_timeout
    monkeypatch.setenv(eval_lockstep.TIMEOUT_ENV, "42")
    assert eval_lockstep._timeout().total_seconds() == 42

"""Per-rank checkpoints of expert-parallel runs: save, resume, consolidate, split, refusals.

Real runs: 2 gloo processes started by torchrun through ``stablemoe-train``
(``-m fairseq_stablemoe.launch``, which adds the distributed flags), a tiny
model with 4 experts (2 per process) and the stage boundary at update 3.

Adam runs with ``beta1 = 0`` where a checkpoint is compared with the 2-process
validation: with momentum, the frozen distilled router drifts by one Adam step
after every update on more than one process (``legacy_ddp`` gives it zero
gradients) and validation routes with the drifted copy, while checkpoints hold
the frozen snapshot; see ``test_validation_routes_with_the_frozen_router``.

``--required-batch-size-multiple 1``: this fairseq drops a last batch that is
not a multiple of it, so validation would skip a few samples that
``fairseq-eval-lm`` scores.
"""

import json
import os
import re
import shutil
import sys

import pytest
import torch
import warm
from corpus import free_port, markov_corpus, run_checked

from fairseq_stablemoe.checkpoints.rank_files import META_KEY
from fairseq_stablemoe.cli import consolidate
from fairseq_stablemoe.cli.train import PACKAGE_DIR, launch_args

TWO_STAGE = 3
TINY = [
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
    str(TWO_STAGE),
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
    "--save-interval-updates",
    "2",
    "--keep-interval-updates",
    "3",
    "--no-epoch-checkpoints",
    "--log-format",
    "json",
    "--log-interval",
    "1",
    "--seed",
    "3",
    "--num-workers",
    "0",
    "--cpu",
    "--ddp-backend",
    "legacy_ddp",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return markov_corpus(tmp_path_factory.mktemp("ckpt_corpus"), 600, 100, vocab=120, seed=0)


def train(data, save, *extra, nproc=2, max_update=8, ok=True):
    """``stablemoe-train`` on ``nproc`` processes (torchrun for 2); returns the combined output."""
    args = [str(data), *TINY, "--save-dir", str(save), "--max-update", str(max_update), *extra]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            "fairseq_stablemoe.launch",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "fairseq_stablemoe.launch", *args]
    return run_checked(cmd, ok)


def logged(output: str, tag: str):
    """``{num_updates: record}`` of the JSON records logged under ``tag`` (train_inner or valid)."""
    found = {}
    for line in output.splitlines():
        m = re.search(rf"\| {tag} \| (\{{.*\}})\s*$", line)
        if m:
            rec = json.loads(m.group(1))
            found[int(rec.get("num_updates", rec.get("valid_num_updates")))] = rec
    return found


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def expert_keys(state, local):
    return [k for k in state["model"] if f".experts.{local}." in k]


def router_keys(state):
    return [k for k in state["model"] if "distill_router" in k]


def opt_state_by_name(state):
    names = state["extra_state"][META_KEY]["optimizer_param_names"]
    opt = state["last_optimizer_state"]
    return {names[i]: st for i, st in opt["state"].items()}


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory):
    """8 updates on 2 processes, checkpoints every 2 updates, the 3 newest kept."""
    save = tmp_path_factory.mktemp("run_a")
    out = train(corpus, save)
    return save, out


def test_every_rank_saves_its_own_experts(run_a):
    save, out = run_a
    names = sorted(p.name for p in save.glob("*.pt"))
    for stem in ("checkpoint_1_4", "checkpoint_1_6", "checkpoint_1_8", "checkpoint_last", "checkpoint_best"):
        for r in range(2):
            assert f"{stem}-rank{r}-of2.pt" in names, names
    # --keep-interval-updates 3 removed update 2 on both ranks; no rank-less files
    assert "checkpoint_1_2-rank0-of2.pt" in out
    assert not any(n.startswith("checkpoint_1_2") for n in names), names
    assert not (save / "checkpoint_last.pt").exists()

    ranks = [load(save / f"checkpoint_last-rank{r}-of2.pt") for r in range(2)]
    for r, state in enumerate(ranks):
        meta = state["extra_state"][META_KEY]
        assert (meta["rank"], meta["world_size"], meta["num_experts"], meta["num_updates"]) == (r, 2, 4, 8)
        assert len({k.split(".experts.")[1].split(".")[0] for k in state["model"] if ".experts." in k}) == 2
    assert ranks[0]["extra_state"][META_KEY]["run_id"] == ranks[1]["extra_state"][META_KEY]["run_id"]
    # shared parameters are the same on both ranks, the experts are not
    for key, value in ranks[0]["model"].items():
        if ".experts." not in key:
            assert torch.equal(value, ranks[1]["model"][key]), key
    fc1 = [k for k in expert_keys(ranks[0], 0) if k.endswith("fc1.weight")][0]
    assert not torch.equal(ranks[0]["model"][fc1], ranks[1]["model"][fc1])


def test_router_frozen_in_every_post_boundary_checkpoint(run_a):
    save, _ = run_a
    for r in range(2):
        states = [load(save / f"checkpoint_1_{u}-rank{r}-of2.pt") for u in (4, 6, 8)]
        keys = router_keys(states[0])
        assert any(k.endswith("frozen") for k in keys)
        for state in states:
            assert all(bool(state["model"][k]) for k in keys if k.endswith("frozen"))
            for k in keys:
                assert torch.equal(state["model"][k], states[0]["model"][k]), (r, k)


def test_resume_after_the_boundary_restores_every_rank(run_a, corpus, tmp_path):
    save_a, out_a = run_a
    out_c = train(corpus, tmp_path / "c", "--restore-file", str(save_a / "checkpoint_1_4.pt"))
    assert f"Loaded checkpoint {save_a / 'checkpoint_1_4-rank0-of2.pt'} (epoch 1 @ 4 updates)" in out_c

    # the resumed run continues exactly where the uninterrupted one went
    a, c = logged(out_a, "train_inner"), logged(out_c, "train_inner")
    assert sorted(c) == [5, 6, 7, 8]
    for u in c:
        assert float(c[u]["loss"]) == pytest.approx(float(a[u]["loss"]), abs=1.5e-3), u
    assert logged(out_c, "valid")[8]["valid_loss"] == logged(out_a, "valid")[8]["valid_loss"]

    # rank 1: its experts and their Adam state were restored from its own file
    before = load(save_a / "checkpoint_1_4-rank1-of2.pt")
    after_a = load(save_a / "checkpoint_last-rank1-of2.pt")
    after_c = load(tmp_path / "c" / "checkpoint_last-rank1-of2.pt")
    rank0 = load(save_a / "checkpoint_1_4-rank0-of2.pt")
    moved = 0
    for local in range(2):
        for k in expert_keys(after_a, local):
            torch.testing.assert_close(after_c["model"][k], after_a["model"][k], rtol=1e-5, atol=1e-6)
            moved += not torch.equal(after_a["model"][k], before["model"][k])
            assert not torch.equal(before["model"][k], rank0["model"][k]) or "norm" in k
    assert moved > 0
    opt_a, opt_c = opt_state_by_name(after_a), opt_state_by_name(after_c)
    checked = 0
    for name, st in opt_a.items():
        if ".experts." in name:
            torch.testing.assert_close(opt_c[name]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-5, atol=1e-9)
            assert float(opt_c[name]["step"]) == float(st["step"]) == 8
            checked += 1
    assert checked == len(expert_keys(after_a, 0)) * 2
    # the frozen router came back as saved
    for k in router_keys(before):
        assert torch.equal(after_c["model"][k], before["model"][k]), k


def _consolidate(*argv):
    consolidate.cli_main([str(a) for a in argv])


def test_consolidated_checkpoint_evaluates_like_the_two_process_run(run_a, corpus, tmp_path):
    save, out = run_a
    _consolidate(save / "checkpoint_last.pt", "-o", tmp_path / "all.pt")
    state = load(tmp_path / "all.pt")
    ranks = [load(save / f"checkpoint_last-rank{r}-of2.pt") for r in range(2)]
    meta = state["extra_state"][META_KEY]
    assert (meta["world_size"], meta["num_experts"], meta["num_updates"], meta["consolidated_from"]) == (1, 4, 8, 2)
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 1
    for glob in range(4):
        rank, local = divmod(glob, 2)
        for k in expert_keys(state, glob):
            local_key = k.replace(f".experts.{glob}.", f".experts.{local}.")
            assert torch.equal(state["model"][k], ranks[rank]["model"][local_key])
    # optimizer state merged by name: global expert 2 + i is rank 1's local expert i
    merged, r1 = opt_state_by_name(state), opt_state_by_name(ranks[1])
    assert len(merged) == len(state["extra_state"][META_KEY]["optimizer_param_names"])
    for name, st in r1.items():
        glob_name = re.sub(r"\.experts\.(\d+)\.", lambda m: f".experts.{2 + int(m.group(1))}.", name)
        assert torch.equal(merged[glob_name]["exp_avg_sq"], st["exp_avg_sq"]), name

    ev = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.eval_lm",
            str(corpus),
            "--path",
            str(tmp_path / "all.pt"),
            "--user-dir",
            PACKAGE_DIR,
            "--gen-subset",
            "valid",
            "--tokens-per-sample",
            "32",
            "--max-tokens",
            "1024",
            "--cpu",
            "--num-workers",
            "0",
        ],
        merge=True,
    )
    assert ev.returncode == 0, ev.stdout[-3000:]
    m = re.search(r"Evaluated ([\d,]+) tokens.*\n.*Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", ev.stdout)
    assert m, ev.stdout[-2000:]
    valid = logged(out, "valid")[8]
    # the same tokens (all of the valid split, 32-token blocks) and the same model:
    # loss logged with 3 decimals, so |diff| <= 5e-4 (+ float noise) -> ppl within 4e-4 relative
    valid_tokens = sum(len(line.split()) + 1 for line in (corpus.parent / "valid.txt").read_text().splitlines())
    assert int(m.group(1).replace(",", "")) == valid_tokens
    assert float(m.group(2)) == pytest.approx(float(valid["valid_loss"]), abs=6e-4)
    assert float(m.group(3)) == pytest.approx(2 ** float(valid["valid_loss"]), rel=1e-3)


def test_split_resumes_on_two_processes(run_a, corpus, tmp_path):
    save, out_a = run_a
    _consolidate(save / "checkpoint_1_4-rank1-of2.pt", "-o", tmp_path / "c4.pt")  # any rank's file names the run
    # round trip: splitting the consolidated checkpoint gives back the rank files
    _consolidate(tmp_path / "c4.pt", "--shards", "2", "-o", tmp_path / "d" / "checkpoint_last.pt")
    for r in range(2):
        orig = load(save / f"checkpoint_1_4-rank{r}-of2.pt")
        split = load(tmp_path / "d" / f"checkpoint_last-rank{r}-of2.pt")
        assert split["model"].keys() == orig["model"].keys()
        for k, v in orig["model"].items():
            assert torch.equal(split["model"][k], v), k
        so, ss = opt_state_by_name(orig), opt_state_by_name(split)
        assert so.keys() == ss.keys()
        for name in so:
            assert torch.equal(ss[name]["exp_avg_sq"], so[name]["exp_avg_sq"]), name
        assert split["extra_state"][META_KEY]["rank"] == r
    # 4 processes (1 expert each) works too
    _consolidate(tmp_path / "c4.pt", "--shards", "4", "-o", tmp_path / "four" / "x.pt")
    assert len(list((tmp_path / "four").glob("x-rank*-of4.pt"))) == 4

    out_d = train(corpus, tmp_path / "d")
    assert "(epoch 1 @ 4 updates)" in out_d
    a, d = logged(out_a, "train_inner"), logged(out_d, "train_inner")
    assert sorted(d) == [5, 6, 7, 8]
    for u in d:
        assert float(d[u]["loss"]) == pytest.approx(float(a[u]["loss"]), abs=1.5e-3), u
    assert logged(out_d, "valid")[8]["valid_loss"] == logged(out_a, "valid")[8]["valid_loss"]


def test_experts_not_divisible_by_processes(corpus, tmp_path):
    out = train(corpus, tmp_path, "--num-experts", "3", ok=False)
    assert "--num-experts 3 does not fit 2 data-parallel processes" in out


def test_missing_rank_file_is_named(run_a, corpus, tmp_path):
    save, _ = run_a
    shutil.copy(save / "checkpoint_last-rank0-of2.pt", tmp_path / "checkpoint_last-rank0-of2.pt")
    out = train(corpus, tmp_path, ok=False)
    assert f"missing per-rank checkpoint file(s): {tmp_path / 'checkpoint_last-rank1-of2.pt'} (rank 1)" in out


def test_rank_files_of_different_updates_are_refused(run_a, corpus, tmp_path):
    save, _ = run_a
    shutil.copy(save / "checkpoint_1_6-rank0-of2.pt", tmp_path / "checkpoint_last-rank0-of2.pt")
    shutil.copy(save / "checkpoint_1_8-rank1-of2.pt", tmp_path / "checkpoint_last-rank1-of2.pt")
    out = train(corpus, tmp_path, ok=False)
    assert "from different runs or updates" in out and "at update 6" in out and "at update 8" in out


def test_process_count_mismatch_names_the_fix(run_a, corpus, tmp_path):
    save, _ = run_a
    # a one-process checkpoint where 2 processes resume
    two = tmp_path / "two"
    _consolidate(save / "checkpoint_last.pt", "-o", two / "checkpoint_last.pt")
    out = train(corpus, two, ok=False)
    assert f"split it with `stablemoe-consolidate {two / 'checkpoint_last.pt'} --shards 2`" in out
    # per-rank files where 1 process resumes
    one = tmp_path / "one"
    one.mkdir()
    for r in range(2):
        shutil.copy(save / f"checkpoint_last-rank{r}-of2.pt", one)
    out = train(corpus, one, nproc=1, ok=False)
    assert f"consolidate them with `stablemoe-consolidate {one / 'checkpoint_last-rank0-of2.pt'}`" in out


def test_consolidate_refusals(run_a, tmp_path, capsys):
    save, _ = run_a

    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            _consolidate(*argv)
        assert e.value.code == 2
        return capsys.readouterr().err

    for r in range(2):
        shutil.copy(save / f"checkpoint_1_6-rank{r}-of2.pt", tmp_path / f"x-rank{r}-of2.pt")
    # missing shard
    os.rename(tmp_path / "x-rank1-of2.pt", tmp_path / "keep.pt")
    err = fails(tmp_path / "x.pt")
    assert f"missing per-rank checkpoint file(s): {tmp_path / 'x-rank1-of2.pt'} (rank 1 of 2)" in err
    # shards of different updates
    shutil.copy(save / "checkpoint_1_8-rank1-of2.pt", tmp_path / "x-rank1-of2.pt")
    err = fails(tmp_path / "x.pt")
    assert "from different runs or updates" in err and "update 6" in err and "update 8" in err
    os.replace(tmp_path / "keep.pt", tmp_path / "x-rank1-of2.pt")
    # flat --fp16 optimizer state (one fp32 vector per rank) cannot be merged by expert
    for r in range(2):
        path = tmp_path / f"x-rank{r}-of2.pt"
        state = load(path)
        state["extra_state"][META_KEY]["optimizer_param_names"] = None
        state["last_optimizer_state"] = {
            "state": {0: {"exp_avg": torch.zeros(10)}},
            "param_groups": [{"lr": 1.0, "params": [0]}],
            "loss_scale": 8.0,
        }
        torch.save(state, path)
    err = fails(tmp_path / "x.pt")
    assert "flat --fp16 optimizer state" in err and "--no-optimizer" in err and "--reset-optimizer" in err
    assert "--fp16-no-flatten-grads" in err
    _consolidate(tmp_path / "x.pt", "--no-optimizer")
    assert "last_optimizer_state" not in load(tmp_path / "x.pt")
    assert "exists: pass --force" in fails(tmp_path / "x.pt", "--no-optimizer")
    # a split that does not divide the experts; nothing to consolidate
    err = fails(tmp_path / "x.pt", "--shards", "3", "-o", tmp_path / "y.pt")
    assert "4 experts cannot be split over 3 processes" in err and "use --shards in [1, 2, 4]" in err
    os.makedirs(tmp_path / "solo")
    shutil.copy(tmp_path / "x.pt", tmp_path / "solo" / "x.pt")
    assert "already a one-process checkpoint" in fails(tmp_path / "solo" / "x.pt")


def test_launch_adds_the_distributed_flags():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    added = launch_args(["data", "--cpu"], torchrun)
    assert added == [
        "--user-dir",
        PACKAGE_DIR,
        "--distributed-init-method",
        "env://",
        "--distributed-world-size",
        "2",
        "--distributed-rank",
        "1",
        "--distributed-no-spawn",
        "--device-id",
        "1",
        "--distributed-backend",
        "gloo",
    ]
    # what the user gave is kept; no gloo on GPUs
    added = launch_args(["data", "--user-dir", "x", "--distributed-backend=nccl", "--device-id", "0"], torchrun)
    assert added == [
        "--distributed-init-method",
        "env://",
        "--distributed-world-size",
        "2",
        "--distributed-rank",
        "1",
        "--distributed-no-spawn",
    ]
    # outside torchrun (or a single process) only the plugin is added
    assert launch_args(["data"], {}) == ["--user-dir", PACKAGE_DIR]
    assert launch_args(["data"], dict(torchrun, WORLD_SIZE="1", RANK="0")) == ["--user-dir", PACKAGE_DIR]


@pytest.mark.slow
def test_validation_routes_with_the_frozen_router(corpus, tmp_path):
    # default Adam betas (0.9, 0.999): legacy_ddp gives the frozen router zero gradients and
    # momentum would move its parameters; routing must still use the frozen values
    out = train(corpus, tmp_path / "m", max_update=6)
    _consolidate(tmp_path / "m" / "checkpoint_last.pt", "-o", tmp_path / "all.pt")
    ev = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.eval_lm",
            str(corpus),
            "--path",
            str(tmp_path / "all.pt"),
            "--user-dir",
            PACKAGE_DIR,
            "--gen-subset",
            "valid",
            "--tokens-per-sample",
            "32",
            "--max-tokens",
            "1024",
            "--cpu",
            "--num-workers",
            "0",
        ],
        merge=True,
    )
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", ev.stdout).group(1))
    assert loss == pytest.approx(float(logged(out, "valid")[6]["valid_loss"]), abs=6e-4)


@pytest.mark.parametrize(
    "boundary", [pytest.param(6, marks=pytest.mark.slow), 4], ids=["boundary-inside-second-half", "boundary-at-resume"]
)
def test_two_process_resume_is_bit_exact(corpus, tmp_path, boundary):
    """8 updates straight == resuming from that run's update-4 files and training 4 more: every rank's file."""
    extra = ["--two-stage-updates", str(boundary), "--dropout", "0.1", "--weight-decay", "0.01"]
    out_s = train(corpus, tmp_path / "straight", *extra)
    (tmp_path / "resumed").mkdir()
    for rank in range(2):
        shutil.copy(
            tmp_path / "straight" / f"checkpoint_1_4-rank{rank}-of2.pt",
            tmp_path / "resumed" / f"checkpoint_last-rank{rank}-of2.pt",
        )
    out_2 = train(corpus, tmp_path / "resumed", *extra)
    assert "Loaded checkpoint" in out_2 and "(epoch 1 @ 4 updates)" in out_2, out_2[-3000:]
    s, r2 = logged(out_s, "train_inner"), logged(out_2, "train_inner")
    assert sorted(s) == list(range(1, 9)) and sorted(r2) == [5, 6, 7, 8]
    for u in range(5, 9):
        for key in ("loss", "balance_loss", "distill_loss", "stage"):
            assert r2[u].get(key) == s[u].get(key), (u, key)
    for rank in range(2):
        a = load(tmp_path / "straight" / f"checkpoint_last-rank{rank}-of2.pt")
        b = load(tmp_path / "resumed" / f"checkpoint_last-rank{rank}-of2.pt")
        assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (rank, k)
        assert b["model"]["decoder.layers.1.moe.distill_router.frozen"].item()

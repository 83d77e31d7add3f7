"""One model whatever the process layout, through ``fairseq-train`` (CUDA-only paths simulated).

From the same seed and no shared initial file, 1 process with ``--update-freq 2``
and 2 expert-parallel processes (2 of the 4 experts each) see the same global
batches, so they must log the same loss, gradient norm (experts included,
Adam, ``--clip-norm`` on) and distillation loss at every update, and the same
validation loss. The data are sized so that the training epoch and the
validation set have an odd number of batches: the second process gets
fairseq's empty filler batches (dummy forwards, collective MoE layers in
lockstep). fairseq's cross-process gradient-norm check, which only runs on
CUDA, is switched on over gloo (tests/train_worker.py). The balance loss is
off (its counts are per forward: a forward of one process is half of a 2-process
forward). The shared runs use exact distillation (``--distill-refit``): the
routing counts, logged windows and the frozen table are global, so they too
must not depend on the layout (the filler batch is not counted).
"""

import os
import re
import sys
from pathlib import Path

import pytest
import torch
import warm
from corpus import free_port, markov_corpus
from test_checkpointing import load, logged

WORKER = str(Path(__file__).with_name("train_worker.py"))
ARGS = [
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
    "--moe-sublayers",
    "2",
    "--distill-dim",
    "16",
    "--tokens-per-sample",
    "16",
    "--batch-size",
    "3",
    "--batch-size-valid",
    "3",
    "--required-batch-size-multiple",
    "1",
    "--two-stage-updates",
    "6",
    "--balance-factor",
    "0",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
    "--clip-norm",
    "0.1",
    "--dropout",
    "0",
    "--max-update",
    "14",
    "--validate-interval-updates",
    "7",
    "--no-save",
    "--log-format",
    "json",
    "--log-interval",
    "1",
    "--seed",
    "5",
    "--num-workers",
    "0",
    "--cpu",
    "--ddp-backend",
    "legacy_ddp",
]


def launch(data, *extra, nproc=1, env=None, timeout=300, save_dir=None):
    """The worker on ``nproc`` processes (each its own subprocess, as torchrun starts them);
    returns ``[(returncode, output)]`` per rank. A process stuck in a collective fails the timeout.
    ``save_dir``: save checkpoints there (else ``--no-save``)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        penv = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        if nproc > 1:
            penv.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        # where fairseq writes crash.pt on an error, or the checkpoints
        save = ["--save-dir", str(save_dir or Path(data) / "save")]
        args = [a for a in ARGS if not (save_dir and a == "--no-save")]
        procs.append(warm.start([sys.executable, WORKER, str(data), *args, *save, *extra], env=penv, merge=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [p.output()[0] for p in procs]
    return list(zip(codes, outs))


def batches(output: str, split: str):
    """Batches of every ``split`` epoch iterator this process made."""
    return [int(m.group(1)) for m in re.finditer(rf"stablemoe-test: {split} (\d+) batches", output)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return markov_corpus(tmp_path_factory.mktemp("layouts"), 70, 23, vocab=60, seed=4)


# stage 1 to update 12, so that the epoch's filler batch falls in it; the boundary's checkpoint is saved
REFIT = ["--two-stage-updates", "12", "--distill-refit", "--refit-updates", "4", "--save-interval-updates", "12"]


@pytest.fixture(scope="module")
def runs(data):
    ((rc1, one),) = launch(data, "--update-freq", "2", *REFIT, save_dir=Path(data) / "one")
    assert rc1 == 0, one[-4000:]
    two = launch(data, *REFIT, nproc=2, save_dir=Path(data) / "two")
    for rc, out in two:
        assert rc == 0, out[-4000:]
    return one, two[0][1]


def test_filler_batches_occur(runs):
    one, _ = runs
    train_batches, valid_batches = batches(one, "train")[0], batches(one, "valid")[0]
    # an odd number of batches: the second of 2 processes gets fairseq's empty filler batch
    assert train_batches % 2 == 1 and valid_batches % 2 == 1, (train_batches, valid_batches)
    assert (train_batches + 1) // 2 < 12, "the run should cross the end of epoch 1 in stage 1"


def test_same_losses_gradient_norms_and_validation(runs):
    one, two = (logged(out, "train_inner") for out in runs)
    assert sorted(one) == sorted(two) == list(range(1, 15))
    for u in range(1, 15):
        for key in ("loss", "gnorm"):
            assert float(two[u][key]) == pytest.approx(float(one[u][key]), rel=2e-3, abs=2e-3), (u, key)
        if u <= 6:  # stage 1
            assert float(two[u]["distill_loss"]) == pytest.approx(float(one[u]["distill_loss"]), rel=2e-3), u
    assert float(one[14]["gnorm"]) > 0.1  # clipping was on
    v1, v2 = (logged(out, "valid") for out in runs)
    assert sorted(v1) == sorted(v2) and {7, 14} <= set(v1)  # and at the end of epoch 1
    for u in v1:
        assert float(v2[u]["valid_loss"]) == pytest.approx(float(v1[u]["valid_loss"]), rel=2e-3), u


def test_same_routing_counts_and_refit_table(runs, data):
    """The windows' ceiling and churn (log interval 1: every update a window), the validation
    agreement after the boundary, and the frozen table and hand-over statistics in the boundary's
    checkpoint are the same on 1 and 2 processes."""
    one, two = (logged(out, "train_inner") for out in runs)
    for u in range(1, 13):  # stage 1: a window per update; churn from the second
        assert one[u]["agree_ceiling"] == two[u]["agree_ceiling"], u
        assert 0 < float(one[u]["agree_ceiling"]) <= 1
        if u > 1:
            assert one[u]["route_churn"] == two[u]["route_churn"], u
    # stage 2 counts nothing (fairseq keeps a reset meter's key, with no value)
    assert all(one[u].get("agree_ceiling") in (None, "None") for u in range(13, 15)), one[13]
    v1, v2 = (logged(out, "valid") for out in runs)
    assert float(v1[14]["valid_stage"]) == float(v2[14]["valid_stage"]) == 2.0
    assert v1[14]["valid_router_agree"] == v2[14]["valid_router_agree"]
    (path,) = (Path(data) / "one").glob("checkpoint_*_12.pt")
    single = load(path)["model"]
    keys = [k for k in single if k.endswith("refit_choice") or k.endswith("counts.handover")]
    assert len(keys) == 2
    for rank in range(2):
        state = load(path.parent.parent / "two" / path.name.replace(".pt", f"-rank{rank}-of2.pt"))["model"]
        for key in keys + [k.replace("distill_router.refit_choice", "counts.refit_counts") for k in keys]:
            assert torch.equal(state[key], single[key]), (rank, key)
    handover = single[keys[1] if keys[1].endswith("handover") else keys[0]].tolist()
    assert handover[0] == 1.0 and handover[3] > 0  # the frozen table is the window's majority map
    assert single[keys[0] if keys[0].endswith("refit_choice") else keys[1]].ge(0).all()
    for out in runs:
        assert re.search(r"stage 2 from update 12: distilled router frozen with the backbone's majority table", out)


def test_refit_table_survives_consolidation_and_routes_inference(runs, data, tmp_path):
    """The 2-process run's per-rank files consolidated into one keep the table, and the loaded model
    routes inference (as fairseq-eval-lm, -generate and -interactive do) by it."""
    from fairseq import checkpoint_utils
    from test_checkpointing import _consolidate

    (path,) = (Path(data) / "one").glob("checkpoint_*_12.pt")
    merged = tmp_path / "merged.pt"
    _consolidate(path.parent.parent / "two" / path.name, "-o", merged)
    single, state = load(path)["model"], load(merged)["model"]
    keys = [k for k in single if k.endswith(("refit_choice", "refit_counts", "handover"))]
    assert len(keys) == 3 and all(torch.equal(state[k], single[k]) for k in keys)
    (model,), _ = checkpoint_utils.load_model_ensemble([str(merged)])
    moe = model.moe_layers[0].eval()
    table = next(v for k, v in single.items() if k.endswith("refit_choice"))
    tokens = torch.arange(4, table.numel()).view(-1, 1)
    features = torch.randn(tokens.shape[0], 1, moe.backbone.expert_centroids.shape[1])
    routed = moe.assignment(features, tokens, training_routing=False).view(-1)
    assert torch.equal(routed, table[4:])


@pytest.mark.parametrize("precision", ["--fp16", pytest.param("--memory-efficient-fp16", marks=pytest.mark.slow)])
def test_half_precision_norm_passes_the_cross_process_check(data, precision):
    """fairseq's --fp16 paths on 2 processes (CPU simulation): the plugin's norm is identical on both
    processes and equals the 1-process norm; fairseq's own (flat --fp16: each process's norm includes
    its own experts) stops at the first update with "gradients are inconsistent between workers"."""
    ((rc, one),) = launch(data, precision, "--max-update", "3", "--update-freq", "2")
    assert rc == 0, one[-3000:]
    two = launch(data, precision, "--max-update", "3", nproc=2)
    for rc, out in two:
        assert rc == 0, out[-3000:]
    a, b = logged(one, "train_inner"), logged(two[0][1], "train_inner")
    for u in (1, 2, 3):
        assert float(b[u]["gnorm"]) == pytest.approx(float(a[u]["gnorm"]), rel=1e-2), u
    if precision == "--fp16":
        for rc, out in launch(data, precision, "--max-update", "3", nproc=2, env={"STABLEMOE_TEST_FAIRSEQ_NORM": "1"}):
            assert rc != 0 and "gradients are inconsistent between workers" in out, out[-3000:]


def test_inf_in_one_process_experts_stops_every_process(data):
    """fp32: the inf is in rank 1's experts only, yet both processes see a non-finite norm at that
    update and fairseq's check stops both (before, rank 0 went on with finite weights and rank 1
    with NaN experts, and fairseq's norm, experts left out, saw nothing)."""
    results = launch(data, nproc=2, env={"STABLEMOE_TEST_INF_AT": "3"})
    for rank, (rc, out) in enumerate(results):
        assert rc != 0, out[-3000:]
        assert "gradients are inconsistent between workers" in out, out[-3000:]
        assert re.search(r"rank +0 = inf", out) and re.search(r"rank +1 = inf", out), out[-3000:]
        # fairseq saves crash.pt on the error: one file per rank, not all ranks writing one name
        assert (Path(data) / "save" / f"crash-rank{rank}-of2.pt").is_file()
        assert "No such file or directory" not in out, out[-3000:]
    log = results[0][1]  # fairseq logs on rank 0: updates 1-3 done, the 4th stopped
    assert '"num_updates": "3"' in log and '"num_updates": "4"' not in log


def test_layerdrop_over_moe_layers_is_refused(data):
    results = launch(data, "--decoder-layerdrop", "0.2", "--max-update", "1", nproc=2)
    for rc, out in results:
        assert rc != 0
        assert "--decoder-layerdrop 0.2 could skip an MoE layer" in out and "use --decoder-layerdrop 0" in out


@pytest.mark.parametrize("where, at", [("train", "3"), pytest.param("valid", "7", marks=pytest.mark.slow)])
def test_out_of_memory_on_one_process_stops_every_process(data, where, at):
    """A CUDA out-of-memory error in rank 1's expert forward (a training forward of update 4, or the
    validation after update 7): fairseq would skip the micro-batch, or retry the validation batch, on
    that process alone, and the MoE layers' collectives would pair with other calls on rank 0 (a hang,
    or wrong split sizes). Both processes stop well within the time limit, rank 1 saying why."""
    results = launch(data, nproc=2, env={"STABLEMOE_TEST_OOM_AT": at, "STABLEMOE_TEST_OOM_IN": where}, timeout=120)
    for rc, out in results:
        assert rc != 0, out[-3000:]
        assert "attempting to recover from OOM" not in out and "retrying batch" not in out, out[-3000:]
    oom = results[1][1]
    assert "rank 1: an out-of-memory error cannot be skipped under expert parallelism" in oom, oom[-3000:]
    assert "Lower --max-tokens" in oom and "--max-tokens-valid" in oom, oom[-3000:]
    log = results[0][1]  # fairseq logs on rank 0: the updates before the error, none after it
    last = int(at)
    assert f'"num_updates": "{last}"' in log and f'"num_updates": "{last + 1}"' not in log, log[-3000:]

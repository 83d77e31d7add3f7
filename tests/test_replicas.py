"""Expert replicas end to end: ``fairseq-train`` on 4 processes with 2 experts (2 replicas each)
in half precision, per-rank checkpoints, consolidation, and a resume on 2 processes.

The numerical equivalence with one process is tested at the trainer level in
test_expert_parallel.py; here: what the files hold (replicas identical, model
and optimizer state), and that the tools and a resume accept them.
"""

import pytest
import torch
from test_checkpointing import _consolidate, corpus, load, logged, opt_state_by_name, train  # noqa: F401

HALF = ["--fp16", "--fp16-no-flatten-grads", "--num-experts", "2"]


@pytest.fixture(scope="module")
def replica_run(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("replicas")
    out = train(corpus, save, *HALF, nproc=4, max_update=4)
    return save, out


def test_replicas_hold_the_same_expert(replica_run):
    save, out = replica_run
    assert '"num_updates": "4"' in out
    ranks = [load(save / f"checkpoint_last-rank{r}-of4.pt") for r in range(4)]
    for first, replica in ((0, 1), (2, 3)):  # ranks 0, 1 hold expert 0; ranks 2, 3 expert 1
        a, b = ranks[first], ranks[replica]
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        opt_a, opt_b = opt_state_by_name(a), opt_state_by_name(b)  # per-parameter fp32 state, named
        assert set(opt_a) == set(opt_b) and any(".experts.0." in n for n in opt_a)
        for name in opt_a:
            for k, v in opt_a[name].items():
                if torch.is_tensor(v):
                    assert torch.equal(v, opt_b[name][k]), (name, k)
    experts = [k for k in ranks[0]["model"] if ".experts.0." in k and k.endswith("fc1.weight")]
    assert experts and not torch.equal(ranks[0]["model"][experts[0]], ranks[2]["model"][experts[0]])


def test_consolidate_and_resume_on_two_processes(replica_run, corpus, tmp_path):
    save, _ = replica_run
    merged = tmp_path / "all.pt"
    _consolidate(save / "checkpoint_last.pt", "-o", merged)
    state = load(merged)
    rank2 = load(save / "checkpoint_last-rank2-of4.pt")
    for key, value in rank2["model"].items():  # global expert 1 is rank 2's expert 0
        if ".experts.0." in key:
            assert torch.equal(state["model"][key.replace(".experts.0.", ".experts.1.")], value), key
    assert any(".experts.1." in n for n in opt_state_by_name(state))  # optimizer state merged by name

    _consolidate(merged, "--shards", "2", "-o", tmp_path / "two" / "checkpoint_last.pt")
    out = train(corpus, tmp_path / "two", *HALF, nproc=2, max_update=6)
    assert "(epoch 1 @ 4 updates)" in out
    assert sorted(logged(out, "train_inner")) == [5, 6]

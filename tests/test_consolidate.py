"""stablemoe-consolidate on synthetic checkpoints: split into per-rank files and merge back, with
the optimizer state, holding at most one input file in memory at a time."""

import gc
import weakref

import pytest
import torch

from fairseq_stablemoe.checkpoints import consolidation
from fairseq_stablemoe.checkpoints.rank_files import META_KEY
from fairseq_stablemoe.cli import consolidate

N = 4
LAYERS = ("decoder.layers.1.moe.", "decoder.layers.3.moe.")


def one_process_state(seed: int = 0):
    """A one-process checkpoint: shared weights, N experts in two MoE layers, Adam-like state by name."""
    g = torch.Generator().manual_seed(seed)
    model = {"decoder.embed_tokens.weight": torch.randn(10, 6, generator=g)}
    for layer in LAYERS:
        model[f"{layer}backbone.expert_centroids"] = torch.randn(N, 6, generator=g)
        for e in range(N):
            model[f"{layer}experts.{e}.0.fc1.weight"] = torch.randn(12, 6, generator=g)
            model[f"{layer}experts.{e}.0.fc2.weight"] = torch.randn(6, 12, generator=g)
    model["decoder.output_projection.weight"] = torch.randn(10, 6, generator=g)
    names = list(model)
    optimizer = {
        "state": {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn_like(model[n])} for i, n in enumerate(names)},
        "param_groups": [{"lr": 0.1, "params": list(range(len(names)))}],
    }
    meta = {
        "format": 1,
        "world_size": 1,
        "rank": 0,
        "num_experts": N,
        "expert_layers": [layer + "experts." for layer in LAYERS],
        "run_id": "r1",
        "num_updates": 5,
        "optimizer_param_names": names,
    }
    return {
        "model": model,
        "last_optimizer_state": optimizer,
        "optimizer_history": [{"num_updates": 5}],
        "extra_state": {META_KEY: meta},
        "args": None,
        "cfg": None,
    }


def optimizer_by_name(state):
    names = state["extra_state"][META_KEY]["optimizer_param_names"]
    opt = state["last_optimizer_state"]
    return {names[i]: opt["state"][i] for g in opt["param_groups"] for i in g["params"]}


def tensors_of(state):
    opt = state.get("last_optimizer_state") or {"state": {}}
    return list(state["model"].values()) + [v for s in opt["state"].values() for v in s.values()]


class Tracked(dict):
    """A loaded checkpoint whose lifetime the test can watch."""


class WatchedIO:
    """Watches consolidate's reads and writes: how many inputs are alive at each read (``most``), that
    no input tensor outlives the output part it went into, and that no written part is still held
    while the next is built."""

    def __init__(self, monkeypatch):
        self.alive, self.most, self.reads, self.tensors, self.written, self.saved = [], 0, [], [], [], []
        real_load, real_save = consolidation.load_file, consolidate.save

        def load(path):
            gc.collect()
            self.alive = [ref for ref in self.alive if ref() is not None]
            state = Tracked(real_load(path))
            self.alive.append(weakref.ref(state))
            self.most = max(self.most, len(self.alive))
            self.reads.append(path)
            self.tensors.extend(weakref.ref(t) for t in tensors_of(state))
            assert all(ref() is None for ref in self.written)
            return state

        def save(state, path, force):
            gc.collect()
            self.saved.append(len([ref for ref in self.alive if ref() is not None]))
            live = {id(ref()) for ref in self.tensors if ref() is not None}
            assert live <= {id(t) for t in tensors_of(state)}
            real_save(state, path, force)
            self.written.extend(weakref.ref(t) for t in tensors_of(state))

        monkeypatch.setattr(consolidation, "load_file", load)
        monkeypatch.setattr(consolidate, "save", save)


@pytest.mark.parametrize("world", [2, 4, 8])  # 8: two replicas of every expert
def test_split_then_merge_gives_the_checkpoint_back_one_input_at_a_time(tmp_path, monkeypatch, world):
    original = one_process_state()
    torch.save(original, tmp_path / "one.pt")
    consolidate.cli_main([str(tmp_path / "one.pt"), "--shards", str(world), "-o", str(tmp_path / "ckpt.pt")])
    parts = [torch.load(tmp_path / f"ckpt-rank{r}-of{world}.pt", weights_only=True) for r in range(world)]
    per_rank = max(1, N // world)
    for r, part in enumerate(parts):
        first = (r * N // world) if world <= N else r // (world // N)
        assert torch.equal(
            part["model"][f"{LAYERS[0]}experts.0.0.fc1.weight"],
            original["model"][f"{LAYERS[0]}experts.{first}.0.fc1.weight"],
        )
        assert sum(".experts." in k for k in part["model"]) == 2 * 2 * per_rank
    del parts

    io = WatchedIO(monkeypatch)
    consolidate.cli_main([str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "merged.pt")])
    assert io.most == 1  # each input file is released before the next is read
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert list(merged["model"]) == list(original["model"])
    for k, v in original["model"].items():
        assert torch.equal(merged["model"][k], v), k
    want, got = optimizer_by_name(original), optimizer_by_name(merged)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name]["exp_avg"], want[name]["exp_avg"]), name


def test_no_optimizer_drops_the_optimizer_state(tmp_path, capsys):
    torch.save(one_process_state(), tmp_path / "one.pt")
    consolidate.cli_main([str(tmp_path / "one.pt"), "--shards", "2", "-o", str(tmp_path / "ckpt.pt")])
    consolidate.cli_main([str(tmp_path / "ckpt.pt"), "--no-optimizer", "-o", str(tmp_path / "merged.pt")])
    out = capsys.readouterr().out
    assert "optimizer state dropped" in out and "peak memory" in out
    assert "last_optimizer_state" not in torch.load(tmp_path / "merged.pt", weights_only=True)


def test_files_of_different_saves_are_refused(tmp_path):
    torch.save(one_process_state(0), tmp_path / "a.pt")
    later = one_process_state(1)
    later["extra_state"][META_KEY]["num_updates"] = 9
    torch.save(later, tmp_path / "b.pt")
    consolidate.cli_main([str(tmp_path / "a.pt"), "--shards", "2", "-o", str(tmp_path / "ckpt.pt")])
    consolidate.cli_main([str(tmp_path / "b.pt"), "--shards", "2", "-o", str(tmp_path / "other.pt")])
    (tmp_path / "other-rank1-of2.pt").replace(tmp_path / "ckpt-rank1-of2.pt")
    with pytest.raises(SystemExit):
        consolidate.cli_main([str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "merged.pt")])
    assert not (tmp_path / "merged.pt").exists()


@pytest.mark.parametrize("source,target", [(2, 4), (4, 2), pytest.param(2, 8, marks=pytest.mark.slow)])  # 8: replicas
def test_reshard_streams_and_equals_a_direct_split(tmp_path, monkeypatch, source, target):
    original = one_process_state()
    torch.save(original, tmp_path / "one.pt")
    consolidate.cli_main([str(tmp_path / "one.pt"), "--shards", str(source), "-o", str(tmp_path / "src.pt")])
    consolidate.cli_main([str(tmp_path / "one.pt"), "--shards", str(target), "-o", str(tmp_path / "direct.pt")])

    io = WatchedIO(monkeypatch)
    consolidate.cli_main(
        [
            str(tmp_path / "src-rank0-of2.pt" if source == 2 else tmp_path / "src.pt"),
            "--shards",
            str(target),
            "-o",
            str(tmp_path / "resharded.pt"),
        ]
    )
    assert io.most == 1  # one input in memory at a time
    assert max(io.saved) <= 1 and len(io.saved) == target  # each output written before the next is built
    # every output reads rank 0 (shared weights, training state) and only the inputs holding its experts
    assert len(io.reads) <= target + max(source, target)

    for r in range(target):
        want = torch.load(tmp_path / f"direct-rank{r}-of{target}.pt", weights_only=True)
        got = torch.load(tmp_path / f"resharded-rank{r}-of{target}.pt", weights_only=True)
        assert list(got["model"]) == list(want["model"])
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), (r, k)
        want_opt, got_opt = optimizer_by_name(want), optimizer_by_name(got)
        assert list(got_opt) == list(want_opt)
        for name in want_opt:
            assert torch.equal(got_opt[name]["exp_avg"], want_opt[name]["exp_avg"]), (r, name)
        meta = got["extra_state"][META_KEY]
        assert (meta["world_size"], meta["rank"], meta["num_experts"], meta["resharded_from"]) == (target, r, N, source)

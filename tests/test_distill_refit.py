"""``--distill-refit`` through ``fairseq-train``: a resume inside the refit window, and bad options.

The table, counts and hand-over statistics of a run resumed from a checkpoint
taken inside the refit window equal those of the uninterrupted run (the counts
are in the checkpoint); 1 against 2 processes is in test_layouts.py, the
table against a direct computation in test_routing_counts.py.
"""

import pytest
import torch
from conftest import BOUNDARY, run_cli, train_args, train_inner_records

#: the refit window is updates 16..30 (the default: the last half of stage 1); a checkpoint at 20 is inside
REFIT = ["--distill-refit", "--save-interval-updates", "10"]


def _moe_state(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    keys = ("distill_router.refit_choice", "counts.refit_counts", "counts.handover", "counts.window_majority")
    found = {k: v for k, v in state.items() if k.endswith(keys)}
    assert len(found) == len(keys), sorted(state)
    return found


@pytest.mark.slow
def test_resume_inside_the_refit_window_gives_the_same_table(markov_data, tmp_path):
    data = markov_data.data_dir
    full = run_cli("train", *train_args(data, tmp_path / "full", *REFIT, "--max-update", "40"))
    run_cli("train", *train_args(data, tmp_path / "part", *REFIT, "--max-update", "20"))
    resumed = run_cli("train", *train_args(data, tmp_path / "part", *REFIT, "--max-update", "40"))
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr and "@ 20 updates" in resumed.stdout + resumed.stderr
    for name in ("checkpoint_3_30.pt", "checkpoint_last.pt"):
        paths = [sorted((tmp_path / run).glob(name.replace("_3_", "_*_"))) for run in ("full", "part")]
        assert len(paths[0]) == len(paths[1]) == 1, paths
        a, b = _moe_state(paths[0][0]), _moe_state(paths[1][0])
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        table = next(v for k, v in a.items() if k.endswith("refit_choice"))
        handover = next(v for k, v in a.items() if k.endswith("handover"))
        assert table.ge(0).all() and handover[0] == 1.0 and handover[4] == BOUNDARY // 2
    # the resumed run logs the same windows as the uninterrupted one after the resume
    logs = [{r["num_updates"]: r for r in train_inner_records(out.stdout + out.stderr)} for out in (full, resumed)]
    for u in ("21", "25", "30"):
        assert logs[0][u]["agree_ceiling"] == logs[1][u]["agree_ceiling"], u
        assert logs[0][u]["route_churn"] == logs[1][u]["route_churn"], u


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distill-refit", "--distill-router", "cnn"], "--distill-refit freezes a token id -> expert table"),
        (["--distill-refit", "--moe-type", "hash"], "--distill-refit refits StableMoE's distilled router"),
        (["--refit-updates", str(BOUNDARY + 1)], "--refit-updates must be between 1 and --two-stage-updates"),
        (["--refit-updates", "0"], "--refit-updates must be between 1 and --two-stage-updates"),
    ],
)
def test_bad_refit_options_stop_before_the_first_batch(markov_data, tmp_path, extra, message):
    out = run_cli("train", *train_args(markov_data.data_dir, tmp_path, *extra, "--max-update", "2"), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and message in text, text[-3000:]
    assert "train_inner" not in text and not list(tmp_path.glob("*.pt"))

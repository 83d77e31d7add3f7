"""``stablemoe-routing-summary`` against a direct computation on the same checkpoint and split.

The direct side routes every non-pad input token of the split itself: the distilled (word
embedding) router's choice is ``argmax(embed[token] @ centroids^T)``, the backbone's is
``argmax(h @ E^T)`` of the MoE layer's input ``h`` (captured with a forward pre-hook on a plain
forward of the model), and the summary's shares, agreement and token count must match.
"""

import json
import sys

import torch
import warm
from conftest import BOUNDARY, REPO
from fairseq import checkpoint_utils

from fairseq_stablemoe.cli.routing_summary import format_summary, summarise


def _direct(data_dir, path):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data_dir)})
    model = models[0].eval()
    task.load_dataset("test")
    captured = []
    hooks = [
        layer.moe.register_forward_pre_hook(lambda m, args, j=j: captured.append((j, args[0], args[1])))
        for j, layer in enumerate(model.decoder.moe_layers)
    ]
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_tokens=512, max_positions=model.max_positions(), num_workers=0
    ).next_epoch_itr(shuffle=False)
    with torch.no_grad():
        for sample in itr:
            model(sample["net_input"]["src_tokens"])
    for h in hooks:
        h.remove()
    out = []
    for j, layer in enumerate(model.decoder.moe_layers):
        moe = layer.moe
        emb, cent = moe.distill_router.embed_tokens.weight, moe.distill_router.centroids
        backbone = moe.backbone.expert_centroids
        n = moe.num_experts
        routed, wanted, agree, tokens = torch.zeros(n), torch.zeros(n), 0, 0
        for k, x, tok in captured:
            if k != j:
                continue
            keep = tok.reshape(-1).ne(task.dictionary.pad())
            t, h = tok.reshape(-1)[keep], x.reshape(-1, x.shape[-1])[keep]
            a = (emb[t].float() @ cent.float().t()).argmax(1)
            b = (h.float() @ backbone.float().t()).argmax(1)
            routed += torch.bincount(a, minlength=n).float()
            wanted += torch.bincount(b, minlength=n).float()
            agree += int((a == b).sum())
            tokens += int(keep.sum())
        out.append(
            {
                "tokens": tokens,
                "load": (routed / tokens).tolist(),
                "backbone_load": (wanted / tokens).tolist(),
                "agreement": agree / tokens,
            }
        )
    return out


def test_summary_matches_routing_the_split_directly(trained_run, tmp_path):
    data, path = trained_run.corpus.data_dir, trained_run.save_dir / "checkpoint_last.pt"
    summary = summarise(str(data), str(path), "test", 8192, cpu=True)
    direct = _direct(data, path)
    assert summary["moe_type"] == "stablemoe" and summary["stage"] == 2
    assert len(summary["layers"]) == len(direct)
    for got, want in zip(summary["layers"], direct):
        assert got["tokens"] == want["tokens"] > 0
        for key in ("load", "backbone_load"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=0, atol=1e-9)
        assert abs(got["agreement"] - want["agreement"]) < 1e-9
        assert got["max_over_mean"] == max(got["load"]) * len(got["load"])
        assert len(set(want["load"])) > 1, "the example should route to more than one expert"

    # the command line prints and writes the same summary
    out = warm.run(
        [
            sys.executable,
            "-m",
            "fairseq_stablemoe.cli.routing_summary",
            str(data),
            "--path",
            str(path),
            "--split",
            "test",
            "--cpu",
            "--json",
            str(tmp_path / "s.json"),
            "--table",
            str(tmp_path / "t.tsv"),
        ],
        cwd=str(REPO),
        check=True,
        timeout=600,
    )
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["layers"] == summary["layers"]
    assert f"{100 * summary['layers'][0]['agreement']:.1f}% of tokens" in out.stdout

    # --table: every dictionary entry's expert is the distilled router's arg-max for it (the routing
    # eval-lm uses), its count the token's non-pad occurrences in the split's model input
    rows = [line.split("\t") for line in (tmp_path / "t.tsv").read_text().splitlines()]
    assert rows[0] == ["layer", "token_id", "token", "expert", "count"]
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    moe = models[0].decoder.moe_layers[0].moe
    routed = (moe.distill_router.embed_tokens.weight.float() @ moe.distill_router.centroids.float().t()).argmax(1)
    task.load_dataset("test")
    counts = torch.zeros(len(task.dictionary), dtype=torch.long)
    for i in range(len(task.dataset("test"))):
        src = task.dataset("test")[i]["source"]
        counts += torch.bincount(src[src.ne(task.dictionary.pad())], minlength=len(task.dictionary))
    table = [r for r in rows[1:] if r[0] == "0"]
    assert [int(r[1]) for r in table] == list(range(len(task.dictionary)))
    assert [r[2] for r in table] == list(task.dictionary.symbols)
    assert [int(r[3]) for r in table] == routed.tolist()
    assert [int(r[4]) for r in table] == counts.tolist() and sum(counts.tolist()) == summary["layers"][0]["tokens"]
    # the summary's most frequent tokens of each expert
    for e in range(moe.num_experts):
        mine = [i for i in range(len(counts)) if routed[i] == e and counts[i] > 0]
        if mine:
            top = max(mine, key=lambda i: counts[i])
            assert f"{task.dictionary[top]}({int(counts[top])})" in out.stdout.split(f"expert {e}: ")[1].split("\n")[0]


def test_summary_gives_the_hand_over_kept_in_the_checkpoint(trained_run):
    """The boundary's agreement and ceiling, recomputed from the checkpoint's refit-window counts and
    its frozen router's weights (the distilled router's own table: the paper's method)."""
    data, path = trained_run.corpus.data_dir, trained_run.save_dir / "checkpoint_last.pt"
    summary = summarise(str(data), str(path), "test", 8192, cpu=True)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    (prefix,) = [k[: -len("counts.refit_counts")] for k in state if k.endswith("counts.refit_counts")]
    counts = state[prefix + "counts.refit_counts"].double()
    emb, cent = state[prefix + "distill_router.embed_tokens.weight"], state[prefix + "distill_router.centroids"]
    frozen = (emb.float() @ cent.float().t()).argmax(1)
    per_id, top = counts.sum(1), counts.max(1).values
    majority = torch.where(counts.gather(1, frozen[:, None]).squeeze(1).eq(top), frozen, counts.argmax(1))
    tokens = float(per_id.sum())
    handover = summary["layers"][0]["handover"]
    assert handover["tokens"] == tokens > 0 and handover["refit_updates"] == BOUNDARY // 2
    assert abs(handover["ceiling"] - float(top.sum()) / tokens) < 1e-12
    assert abs(handover["agree_majority"] - float(per_id[frozen.eq(majority)].sum()) / tokens) < 1e-12
    assert abs(handover["agree_backbone"] - float(counts.gather(1, frozen[:, None]).sum()) / tokens) < 1e-12
    assert handover["agree_majority"] < 1.0, "the paper's distilled router does not reproduce the majority exactly"
    text = format_summary(summary)
    assert (
        f"majority routing on {100 * handover['agree_majority']:.1f}%; ceiling {100 * handover['ceiling']:.1f}%" in text
    )

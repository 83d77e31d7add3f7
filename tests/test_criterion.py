"""The stablemoe criterion's validation logging: what the MoE layers compute at eval depends on it."""

from types import SimpleNamespace

import torch
from test_paper_settings import build_tiny_lm

from fairseq_stablemoe.criterions.stablemoe import StableMoECriterion
from fairseq_stablemoe.modules.moe_layer import reading_moe_stats


def test_validation_logs_the_routing_statistics_that_plain_inference_skips(tmp_path):
    model = build_tiny_lm(tmp_path).eval()
    dictionary = model.decoder.dictionary
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 7))
    with torch.no_grad():
        _, extra = model(tokens)
    # plain inference (fairseq-eval-lm, fairseq-generate): no loss, no diagnostics
    assert all(set(s) == {"num_tokens", "global_tokens", "load", "dropped"} for s in extra["moe"])

    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    criterion = StableMoECriterion(
        task, balance_factor=0.3, distill_factor=0.3, label_smoothing=0.0, sentence_avg=False
    )
    sample = {
        "net_input": {"src_tokens": tokens, "src_lengths": torch.full((2,), 7)},
        "target": tokens,
        "ntokens": tokens.numel(),
    }
    with torch.no_grad():
        loss, _, log = criterion(model, sample)
        _, after = model(tokens)
        with reading_moe_stats():
            _, extra = model(tokens)
    # validation (stage 1 here): the distillation loss, agreement, replaced affinities and stage
    assert 0 <= float(log["moe_agree"]) <= tokens.numel() * len(model.moe_layers)
    assert float(log["distill_loss"]) > 0 and float(log["moe_nonfinite"]) == 0
    assert log["moe_stage"] == 1.0 * tokens.numel()
    for s in extra["moe"]:
        assert {"agree", "nonfinite", "stage", "distill_loss", "backbone_load"} <= set(s)
    # the criterion leaves the model as it was: plain inference after it still skips them
    assert all(set(s) == {"num_tokens", "global_tokens", "load", "dropped"} for s in after["moe"])
    assert float(log["balance_loss"]) == 0.0  # validation routes with the distilled router: no balance loss
    assert torch.isfinite(loss)

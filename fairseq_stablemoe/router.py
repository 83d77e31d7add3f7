"""Routers of a StableMoE layer.

* :class:`BackboneRouter` scores hidden states against the expert centroids
  (``s[t, i] = h_t . E_i``). Its centroids also drive the sigmoid gate in both
  stages, so they keep training after the routing is frozen.
* :class:`DistilledRouter` is the lightweight router of stage 2 and inference:
  a word embedding of the token id and its own centroids
  (``s_hat[t, i] = D(x_t) . E_hat_i``). At the stage boundary it is frozen for
  good (see :meth:`DistilledRouter.freeze`).

All affinities are computed in fp32, also under ``--fp16``/``--bf16``.
"""

import logging
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def make_finite(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN/inf affinities so that argmax stays well defined.

    As the paper's code does, non-finite entries take the smallest finite value
    of the tensor (0 if none is finite).

    Args:
        scores: ``(T, N)`` affinities; not modified.
    Returns:
        ``(finite_scores, num_replaced)``: a ``(T, N)`` tensor and a 0-dim long
        tensor counting the replaced entries.
    """
    ok = torch.isfinite(scores)
    num_bad = (~ok).sum()
    # Branch-free (no host sync): the min over finite entries, +inf if none.
    fill = scores.masked_fill(~ok, float("inf")).amin()
    fill = torch.where(torch.isfinite(fill), fill, torch.zeros_like(fill))
    return torch.where(ok, scores, fill), num_bad


class BackboneRouter(nn.Module):
    """Expert centroids ``E`` (``N x d``, orthogonal init with gain 0.1).

    The parameter is called ``expert_centroids`` (no "router" in its name): it
    keeps training in stage 2 through the gate, unlike the distilled router.
    """

    def __init__(self, embed_dim: int, num_experts: int):
        super().__init__()
        centroids = torch.empty(num_experts, embed_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.expert_centroids = nn.Parameter(centroids)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: ``(T, d)`` -> affinities ``(T, N)`` in fp32."""
        return features.float().matmul(self.expert_centroids.float().t())


class DistilledRouter(nn.Module):
    """Token-id embedding ``D`` (``vocab x distill_dim``) and centroids ``E_hat``.

    Freezing (at ``--two-stage-updates``): the layer then computes these
    affinities without autograd, so the parameters get no gradient. Some
    training paths would still move them (``legacy_ddp`` fills missing
    gradients with zeros and Adam's momentum or weight decay then steps them;
    fairseq's fp16 optimizer steps an fp32 master copy), so :meth:`freeze`
    keeps a snapshot and

    * routing uses the snapshot itself, so it never changes;
    * :meth:`restore_frozen` writes it back into the parameters before every
      training step (fairseq calls ``set_num_updates`` there);
    * the state dict always holds the snapshot under the parameters' own names,
      so every checkpoint after the boundary has bit-identical router weights;
    * the persistent ``frozen`` flag makes a loaded model re-take the snapshot
      from the loaded weights, so the freeze survives any resume.

    Freezing never changes ``requires_grad``: fairseq builds its optimizer's
    parameter groups from it at start-up, and a resume after the boundary
    would then fail to load the optimizer state.
    """

    def __init__(self, vocab_size: int, distill_dim: int, num_experts: int, padding_idx: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, distill_dim, padding_idx=padding_idx)
        centroids = torch.empty(num_experts, distill_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._frozen = False  # python mirror of the buffer: no device sync per forward
        # the snapshot: not saved (the saved parameters are the snapshot)
        self.register_buffer("snapshot_embed_tokens", None, persistent=False)
        self.register_buffer("snapshot_centroids", None, persistent=False)
        self._register_state_dict_hook(DistilledRouter._save_snapshot)
        self.register_load_state_dict_post_hook(DistilledRouter._after_load)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: ``(T,)`` token ids -> affinities ``(T, N)`` in fp32.

        Once frozen, the snapshot routes (never the parameters, which an
        optimizer step may have moved since the last restore, e.g. before a
        validation that runs between two train steps).
        """
        if self.is_frozen:
            emb = F.embedding(tokens, self.snapshot_embed_tokens, padding_idx=self.embed_tokens.padding_idx)
            return emb.float().matmul(self.snapshot_centroids.float().t())
        emb = self.embed_tokens(tokens).float()
        return emb.matmul(self.centroids.float().t())

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    def _params(self):
        return ((self.embed_tokens.weight, "snapshot_embed_tokens"), (self.centroids, "snapshot_centroids"))

    @torch.no_grad()
    def freeze(self) -> None:
        """Snapshot the current parameters; from now on they never change."""
        for param, name in self._params():
            setattr(self, name, param.detach().clone())
        self.frozen.fill_(True)
        self._frozen = True

    @torch.no_grad()
    def unfreeze(self) -> None:
        """Drop the snapshot (the update count was reset below the boundary)."""
        for _, name in self._params():
            setattr(self, name, None)
        self.frozen.fill_(False)
        self._frozen = False

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the snapshot back into the parameters."""
        if not self.is_frozen:
            return
        for param, name in self._params():
            param.data.copy_(getattr(self, name))

    @staticmethod
    def _save_snapshot(module: "DistilledRouter", state_dict, prefix: str, local_metadata) -> None:
        if module.is_frozen:
            state_dict[prefix + "embed_tokens.weight"] = module.snapshot_embed_tokens.detach().clone()
            state_dict[prefix + "centroids"] = module.snapshot_centroids.detach().clone()

    @staticmethod
    def _after_load(module: "DistilledRouter", incompatible_keys) -> None:
        if bool(module.frozen.item()):
            module.freeze()
        else:
            module.unfreeze()

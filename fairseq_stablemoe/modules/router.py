"""Routers of a StableMoE layer.

* :class:`BackboneRouter` scores hidden states against the expert centroids
  (``s[t, i] = h_t . E_i``). Its centroids also drive the sigmoid gate in both
  stages, so they keep training after the routing is frozen.
* :class:`DistilledRouter` is the lightweight router of stage 2 and inference:
  features of the token ids and its own centroids
  (``s_hat[t, i] = D(x)_t . E_hat_i``). ``wordemb`` (the paper's): ``D(x)_t``
  is the embedding of ``x_t``; ``cnn``: a learned mix of the embeddings of
  ``x_t`` and the 4 tokens before it; ``transformer``: a small causal
  Transformer over ``x_1..x_t`` (the paper's Table 6 variants). At the stage
  boundary it is frozen for good (see :meth:`DistilledRouter.freeze`); a
  frozen ``wordemb`` router routes by a token id -> expert table
  (:meth:`DistilledRouter.lookup`).

All affinities are computed in fp32, also under ``--fp16``/``--bf16``.
"""

import logging
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def finite_affinities(raw: torch.Tensor, count: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Replace NaN/inf affinities so that the top-1 choice stays well defined.

    As the paper's code does, non-finite entries take the smallest finite value
    of the tensor (0 if none is finite). One pass, keeping the gradient of the
    finite entries.

    Args:
        raw: ``(T, N)`` affinities, possibly with grad; not modified.
        count: also count the replaced entries.
    Returns:
        ``(scores, num_replaced)``: ``scores`` has ``raw``'s gradient at its
        finite entries (none at the replaced ones); ``num_replaced`` is a 0-dim
        fp32 count (None without ``count``). No host sync.
    """
    with torch.no_grad():
        capped = raw.nan_to_num(nan=math.inf, posinf=math.inf, neginf=math.inf)  # every non-finite entry is +inf
        bad = capped.eq(math.inf)
        fill = capped.amin().nan_to_num(posinf=0.0)  # 0 if nothing is finite
        num_bad = bad.sum(dtype=torch.float32) if count else None
    return torch.where(bad, fill, raw), num_bad


def chosen_affinity(raw: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``finite_affinities(raw)[0]`` at each row's chosen column, as a ``(T, 1)`` column.

    The same values and gradient (a non-finite entry becomes the smallest
    finite one of the whole tensor, 0 if none, and gets no gradient), but
    only the ``T`` chosen entries are replaced.

    Args:
        raw: ``(T, N)`` affinities; choice: ``(T,)`` long columns.
    """
    index = choice.unsqueeze(1)
    with torch.no_grad():
        capped = raw.nan_to_num(nan=math.inf, posinf=math.inf, neginf=math.inf)
        fill = capped.amin().nan_to_num(posinf=0.0)
        chosen = capped.gather(1, index)
        bad = chosen.eq(math.inf)
    if raw.requires_grad:
        chosen = raw.gather(1, index)  # the gradient of the finite entries, as finite_affinities
    return torch.where(bad, fill, chosen)


def top1(scores: torch.Tensor) -> torch.Tensor:
    """``(T, N)`` -> ``(T,)`` long, the first index of each row's maximum (as ``argmax``).

    ``max(dim=1)`` is the faster of the two reductions on CPU (docs/performance.md).
    """
    with torch.no_grad():
        return scores.max(dim=1).indices


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


#: tokens the ``cnn`` distilled router reads: the current one and the 4 before it (as the paper's code)
CNN_WINDOW = 5
DISTILLED_ROUTERS = ("wordemb", "cnn", "transformer")


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(...)`` positions -> ``(..., dim)`` fp32 sinusoidal embeddings (sin half, cos half)."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / max(1, half - 1))
    )
    angles = positions.float().unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class CausalBlock(nn.Module):
    """One pre-norm Transformer block: causal self-attention and a ReLU FFN (4x wide)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, T, d)``; ``allowed``: ``(B, 1, T, T)`` bool, query may attend to key."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.out(att.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.relu(self.fc1(self.ffn_norm(x))))


class DistilledRouter(nn.Module):
    """Token-id features ``D`` (``--distill-router``, ``distill_dim`` wide) and centroids ``E_hat``.

    * ``wordemb``: ``D(x)_t = emb(x_t)`` (``vocab x distill_dim``);
    * ``cnn``: ``D(x)_t = sum_j kernel_j * emb(x_{t-j})``, ``j < 5``, zeros
      before the sequence start (a scalar weight per offset, as the paper's code);
    * ``transformer``: ``layers`` pre-norm causal blocks (``heads`` heads,
      FFN 4x) over ``emb(x) + sinusoidal positions`` (counted from the first
      non-pad token), then a LayerNorm. Pad tokens are never attended to.

    ``cnn`` and ``transformer`` read only the current and earlier tokens of
    the same sequence, so language modelling stays causal, and incremental
    decoding gives a full forward's routing when the router gets the whole
    prefix (see :meth:`forward`).

    Freezing (at ``--two-stage-updates``): the layer then computes these
    affinities without autograd, so the parameters get no gradient. Some
    training paths would still move them (``legacy_ddp`` fills missing
    gradients with zeros and Adam's momentum or weight decay then steps them;
    fairseq's fp16 optimizer steps an fp32 master copy), so :meth:`freeze`
    keeps a snapshot of every parameter and

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

    A frozen ``wordemb`` router is a fixed map from token id to expert: its
    routing *is* the table :meth:`choice_table` (arg-max of the snapshot's
    affinities for every id, :func:`finite_affinities`' replacement over the
    ``V x N`` table, first index on ties), built once and looked up per token
    (:meth:`lookup`), in stage-2 training and at inference alike. With
    ``--distill-refit`` the layer replaces that table at the boundary by the
    backbone's majority routing (:meth:`set_table`); the table is then kept in
    the buffer ``refit_choice`` (``(V,)`` long, -1 when unset) and saved.
    """

    def __init__(
        self,
        vocab_size: int,
        distill_dim: int,
        num_experts: int,
        padding_idx: int,
        kind: str = "wordemb",
        layers: int = 1,
        heads: int = 2,
    ):
        super().__init__()
        if kind not in DISTILLED_ROUTERS:
            raise ValueError(f"unknown --distill-router {kind!r}: choose one of {', '.join(DISTILLED_ROUTERS)}")
        self.kind = kind
        self.embed_tokens = nn.Embedding(vocab_size, distill_dim, padding_idx=padding_idx)
        centroids = torch.empty(num_experts, distill_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)
        if kind == "cnn":
            bound = 1.0 / math.sqrt(CNN_WINDOW)
            self.kernel = nn.Parameter(torch.empty(CNN_WINDOW).uniform_(-bound, bound))
        elif kind == "transformer":
            if heads < 1 or distill_dim % heads:
                raise ValueError(f"--distill-router-heads {heads} must divide --distill-dim {distill_dim}")
            self.blocks = nn.ModuleList(CausalBlock(distill_dim, heads) for _ in range(layers))
            self.final_norm = nn.LayerNorm(distill_dim)
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._frozen = False  # python mirror of the buffer: no device sync per forward
        self.register_buffer("refit_choice", torch.full((vocab_size,), -1, dtype=torch.long))
        self._refit = False  # python mirror: refit_choice holds the table
        self._with_snapshot = False  # inside forward's functional call on the snapshot
        # (key, choice, nonfinite) of choice_table: the key holds the snapshot tensors and their versions
        self._table: Optional[Tuple[tuple, torch.Tensor, torch.Tensor]] = None
        # the snapshot, one buffer per parameter: not saved (the saved parameters are the snapshot)
        for _, buffer in self._snapshot_names():
            self.register_buffer(buffer, None, persistent=False)
        self._register_state_dict_hook(DistilledRouter._save_snapshot)
        self.register_load_state_dict_post_hook(DistilledRouter._after_load)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    @property
    def causal_context(self) -> bool:
        """Whether a token's routing depends on earlier tokens (not only on its own id)."""
        return self.kind != "wordemb"

    def forward(self, tokens: torch.Tensor, num_steps: Optional[int] = None) -> torch.Tensor:
        """Affinities of the last ``num_steps`` time steps (all if None).

        Args:
            tokens: ``(T_ctx, B)`` token ids, time first (``(T,)``: one
                sequence); in incremental decoding the whole prefix.
            num_steps: the trailing time steps to route.
        Returns:
            ``(num_steps * B, N)`` fp32, flattened time-major as ``(T, B)``
            (a ``wordemb`` router accepts ids of any shape and returns one row
            per id of the trailing steps).

        Once frozen, the snapshot routes (never the parameters, which an
        optimizer step may have moved since the last restore, e.g. before a
        validation that runs between two train steps).
        """
        if self.is_frozen and not self._with_snapshot:
            snapshot = {name: getattr(self, buffer) for name, buffer in self._snapshot_names()}
            self._with_snapshot = True
            try:
                return torch.func.functional_call(self, snapshot, (tokens, num_steps))
            finally:
                self._with_snapshot = False
        steps = tokens.shape[0] if num_steps is None else num_steps
        if self.kind == "wordemb":
            feats = self.embed_tokens(tokens if steps == tokens.shape[0] else tokens[tokens.shape[0] - steps :])
        else:
            seq = tokens if tokens.dim() == 2 else tokens.unsqueeze(1)
            feats = self._cnn(seq, steps) if self.kind == "cnn" else self._transformer(seq, steps)
        return feats.reshape(-1, feats.shape[-1]).float().matmul(self.centroids.float().t())

    @property
    def routes_by_table(self) -> bool:
        """Whether routing is the token id -> expert table (a frozen ``wordemb`` router)."""
        return self._frozen and self.kind == "wordemb"

    @torch.no_grad()
    def choice_table(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The routing of every token id by the frozen ``wordemb`` router, cached.

        Returns:
            ``(choice, nonfinite)``: ``(V,)`` long, the expert of each id (the
            arg-max of its snapshot affinities after :func:`finite_affinities`
            over the ``V x N`` table, first index on ties), and ``(V,)`` fp32,
            the number of non-finite affinities of each id.

        Rebuilt when a snapshot tensor is another object (:meth:`freeze`, a
        loaded state dict, a move to another device or dtype) or was changed in
        place (its version counter).
        """
        if not self.routes_by_table:
            raise RuntimeError("choice_table: only a frozen wordemb router routes by a table")
        snapshot = [getattr(self, buffer) for _, buffer in self._snapshot_names()]
        key = tuple((t, t._version) for t in snapshot)
        table = self._table
        if (
            table is None
            or len(table[0]) != len(key)
            or any(t is not old or version != old_version for (t, version), (old, old_version) in zip(key, table[0]))
        ):
            raw = self(torch.arange(self.vocab_size, device=snapshot[0].device))  # the snapshot's affinities
            scores, _ = finite_affinities(raw, count=False)
            nonfinite = raw.isfinite().logical_not().sum(1, dtype=torch.float32)
            self._table = table = (key, top1(scores), nonfinite)
        if self._refit:
            return self.refit_choice, table[2]
        return table[1], table[2]

    @torch.no_grad()
    def own_table(self) -> torch.Tensor:
        """``(V,)`` the frozen snapshot's own arg-max table, also when :meth:`set_table` replaced it."""
        refit, self._refit = self._refit, False
        try:
            return self.choice_table()[0]
        finally:
            self._refit = refit

    @torch.no_grad()
    def set_table(self, choice: torch.Tensor) -> None:
        """Route a frozen ``wordemb`` router by ``choice`` (``(V,)`` long experts) instead of its arg-max."""
        if not self.routes_by_table or choice.shape != self.refit_choice.shape:
            raise RuntimeError("set_table: a frozen wordemb router takes one expert per token id")
        self.refit_choice.copy_(choice)
        self._refit = True

    def lookup(self, ids: torch.Tensor, count: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Route ``(T,)`` token ids by :meth:`choice_table` (a frozen ``wordemb`` router only).

        A ``wordemb`` router routes each id on its own, so in incremental
        decoding the ids are the current tokens themselves.

        Returns:
            ``(choice, num_nonfinite)``: ``(T,)`` long, and with ``count`` the
            0-dim fp32 number of the ids' non-finite affinities (else None).
        """
        choice, nonfinite = self.choice_table()
        with torch.no_grad():
            return choice.index_select(0, ids), (nonfinite.index_select(0, ids).sum() if count else None)

    def _cnn(self, seq: torch.Tensor, steps: int) -> torch.Tensor:
        """``(T_ctx, B)`` -> ``(steps, B, D)``: the kernel over each step's window."""
        emb = self.embed_tokens(seq[max(0, seq.shape[0] - steps - CNN_WINDOW + 1) :])
        width = emb.shape[0]
        padded = F.pad(emb, (0, 0, 0, 0, CNN_WINDOW - 1, 0))  # zeros before the (kept) context
        start = CNN_WINDOW - 1
        feats = sum(self.kernel[j] * padded[start - j : start - j + width] for j in range(CNN_WINDOW))
        return feats[width - steps :]

    def _transformer(self, seq: torch.Tensor, steps: int) -> torch.Tensor:
        """``(T_ctx, B)`` -> ``(steps, B, D)``: causal blocks over the whole context."""
        pad = seq.eq(self.embed_tokens.padding_idx).t()  # (B, T)
        positions = torch.cumsum((~pad).long(), dim=1) * (~pad).long()
        x = self.embed_tokens(seq.t())
        x = x + sinusoidal(positions, x.shape[-1]).to(x.dtype)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        # causal, never a pad key, but every query sees itself (no all-masked row)
        allowed = ((causal & ~pad.unsqueeze(1)) | eye).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)[:, T - steps :].transpose(0, 1)

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    def _snapshot_names(self) -> Iterator[Tuple[str, str]]:
        """``(parameter name, snapshot buffer name)`` of every parameter."""
        for name, _ in self.named_parameters():
            yield name, "snapshot_" + name.replace(".", "_")

    @torch.no_grad()
    def freeze(self) -> None:
        """Snapshot the current parameters; from now on they never change."""
        params = dict(self.named_parameters())
        for name, buffer in self._snapshot_names():
            setattr(self, buffer, params[name].detach().clone())
        self.frozen.fill_(True)
        self._frozen = True
        self._table = None

    @torch.no_grad()
    def unfreeze(self) -> None:
        """Drop the snapshot (the update count was reset below the boundary)."""
        for _, buffer in self._snapshot_names():
            setattr(self, buffer, None)
        self.frozen.fill_(False)
        self._frozen = False
        self._table = None
        self.refit_choice.fill_(-1)
        self._refit = False

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the snapshot back into the parameters."""
        if not self.is_frozen:
            return
        params = dict(self.named_parameters())
        for name, buffer in self._snapshot_names():
            params[name].data.copy_(getattr(self, buffer))

    @staticmethod
    def _save_snapshot(module: "DistilledRouter", state_dict, prefix: str, local_metadata) -> None:
        if module.is_frozen:
            for name, buffer in module._snapshot_names():
                state_dict[prefix + name] = getattr(module, buffer).detach().clone()

    @staticmethod
    def _after_load(module: "DistilledRouter", incompatible_keys) -> None:
        if bool(module.frozen.item()):
            module.freeze()
            module._refit = module.kind == "wordemb" and bool(module.refit_choice.ge(0).all())
        else:
            module.unfreeze()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # a checkpoint saved before --distill-refit existed routes by its own table
        state_dict.setdefault(prefix + "refit_choice", torch.full_like(self.refit_choice, -1))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

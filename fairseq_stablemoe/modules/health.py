"""Expert-collapse warning: one expert taking most tokens for a sustained period."""

import logging
from typing import Optional

import torch

from .options import option_default

logger = logging.getLogger(__name__)

#: the defaults of ``--collapse-share`` and ``--collapse-updates``


class CollapseMonitor:
    """Warns once when the busiest expert's share of tokens stays above ``share``
    for ``patience`` consecutive training updates.

    :meth:`observe` takes the ``(N,)`` load of a training forward (no host
    sync); :meth:`step` is called once per update (from ``set_num_updates``)
    and reads the last load.
    """

    def __init__(
        self,
        layer_name: str,
        share: float = option_default("collapse_share"),
        patience: int = option_default("collapse_updates"),
    ):
        self.layer_name = layer_name
        self.share = share
        self.patience = patience
        self.streak = 0
        self.warned = False
        self._last: Optional[torch.Tensor] = None

    def observe(self, load: torch.Tensor) -> None:
        self._last = load.detach()

    def step(self, num_updates: int) -> None:
        last, self._last = self._last, None
        if last is None or self.warned or self.share >= 1.0:
            return
        total = float(last.sum())
        top = float(last.max()) / total if total > 0 else 0.0
        self.streak = self.streak + 1 if top > self.share else 0
        if self.streak >= self.patience:
            self.warned = True
            logger.warning(
                "%s: expert collapse: the busiest expert has taken more than %.0f%% of the tokens for %d "
                "updates (now %.0f%%, update %d). Consider a larger --balance-factor, a lower learning rate, "
                "or --capacity-factor.",
                self.layer_name,
                100 * self.share,
                self.streak,
                100 * top,
                num_updates,
            )

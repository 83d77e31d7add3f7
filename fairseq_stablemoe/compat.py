"""A shim for fairseq code that numpy 2 broke.

fairseq (0.12.x and the ``fairseq-fixed`` snapshot) uses ``np.compat.long``
in ``TokenBlockDataset`` (hub sampling and scoring of language models:
``build_dataset_for_inference``) and ``LanguagePairDataset``; numpy 2 removed
``np.compat``. With numpy 1 ``np.compat.long`` was Python's ``int``, i.e.
int64 as a dtype; the shim restores exactly that, and only when it is missing.
"""

import types

import numpy as np


def install() -> None:
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)


install()

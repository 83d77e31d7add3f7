"""The registered ``stablemoe`` criterion (:mod:`.stablemoe`). Imports :mod:`..modules` only."""

from . import stablemoe  # noqa: F401  (registers with fairseq)

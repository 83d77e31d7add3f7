"""Checkpoint files: reading them safely, the per-rank files of expert-parallel runs, consolidation.

:mod:`.reading` (``torch.load`` with fairseq's allow-list, diagnosis of unreadable files),
:mod:`.rank_files` (names, the plugin's record, the checks before a load),
:mod:`.consolidation` (merge and re-shard per-rank files). Imports :mod:`..distributed` only; fairseq's
Trainer is patched in :mod:`..fairseq_hooks.trainer_checkpoints`.
"""

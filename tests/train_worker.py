"""``stablemoe-train`` with fairseq's CUDA-only paths simulated on CPU (run by test_layouts.py).

* fairseq checks that the gradient norm is the same on every process
  (``Trainer._check_grad_norms``) only when its buffer exists, which it makes
  only on CUDA with several processes: here it is made on CPU, so the check
  runs over gloo as it would over NCCL.
* ``STABLEMOE_TEST_INF_AT=K``: at update ``K`` rank 1 writes an inf into one
  of its expert gradients just before fairseq clips (after the all-reduce).
* ``STABLEMOE_TEST_FAIRSEQ_NORM=1``: fairseq's own ``clip_grad_norm_``
  (experts left out of the norm), to show the check above is live.
* ``STABLEMOE_TEST_OOM_AT=K`` and ``STABLEMOE_TEST_OOM_IN=train|valid``: rank 1
  raises a CUDA out-of-memory error in its first MoE layer's expert forward at
  update ``K`` (in a training forward, or in the validation after update ``K``).
* Prints the number of batches of every epoch iterator (train and valid), so
  the test can tell that filler batches occurred.

    torchrun --nproc_per_node 2 tests/train_worker.py DATA ... --cpu
"""

import os
import sys

import torch
from fairseq import utils
from fairseq.data import iterators
from fairseq.trainer import Trainer

import fairseq_stablemoe  # noqa: F401  (installs the plugin's hooks)
from fairseq_stablemoe.cli.train import cli_main
from fairseq_stablemoe.fairseq_hooks import trainer_step as training_hooks
from fairseq_stablemoe.modules.experts import Experts
from fairseq_stablemoe.modules.moe_layer import MoELayer

_init = Trainer.__init__
_clip = Trainer.clip_grad_norm
_next_epoch_itr = iterators.EpochBatchIterator.next_epoch_itr
INF_AT = int(os.environ.get("STABLEMOE_TEST_INF_AT", "-1"))
OOM_AT = int(os.environ.get("STABLEMOE_TEST_OOM_AT", "-1"))
OOM_IN = os.environ.get("STABLEMOE_TEST_OOM_IN", "train")


def __init__(self, cfg, *args, **kwargs):
    _init(self, cfg, *args, **kwargs)
    if self.data_parallel_world_size > 1:
        self._grad_norm_buf = torch.zeros(self.data_parallel_world_size, dtype=torch.double)


def clip_grad_norm(self, clip_norm):
    if self.get_num_updates() == INF_AT and self.data_parallel_rank == 1:
        expert = next(p for n, p in self.model.named_parameters() if ".experts." in n)
        expert.grad.view(-1)[0] = float("inf")
    return _clip(self, clip_norm)


def next_epoch_itr(self, shuffle=True, *args, **kwargs):
    itr = _next_epoch_itr(self, shuffle, *args, **kwargs)
    split = "train" if shuffle else "valid"  # fairseq iterates validation in order
    print(
        f"stablemoe-test: {split} {len(self.frozen_batches)} batches, shard {self.shard_id} of {self.num_shards}",
        flush=True,
    )
    return itr


_experts_forward = Experts.forward


def experts_forward(self, sorted_features, counts):
    layer = self._stablemoe_test_layer
    training = OOM_IN == "train"
    if layer.num_updates == OOM_AT and layer.training == training and layer.shard.rank == 1:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test)")
    return _experts_forward(self, sorted_features, counts)


_layer_init = MoELayer.__init__


def layer_init(self, *args, **kwargs):
    _layer_init(self, *args, **kwargs)
    object.__setattr__(self.experts, "_stablemoe_test_layer", self)  # not a submodule: no cycle


Trainer.__init__ = __init__
if OOM_AT >= 0:
    Experts.forward = experts_forward
    MoELayer.__init__ = layer_init
Trainer.clip_grad_norm = clip_grad_norm
iterators.EpochBatchIterator.next_epoch_itr = next_epoch_itr
# fairseq keys its flat --fp16 master copy by torch.cuda.current_device(): make it the
# device index of a CPU tensor, so --fp16 runs its flat path on CPU
torch.cuda.current_device = lambda: None
if os.environ.get("STABLEMOE_TEST_FAIRSEQ_NORM"):
    utils.clip_grad_norm_ = training_hooks._fairseq["clip_grad_norm_"]

if __name__ == "__main__":
    try:
        cli_main()
    except FloatingPointError as e:
        print(f"stablemoe-test: rank {os.environ.get('RANK', '0')} stopped: {e}", flush=True)
        sys.exit(3)

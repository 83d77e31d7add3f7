"""``python -m fairseq_stablemoe.launch ...``: the module form of ``stablemoe-train`` (:mod:`.cli.train`).

torchrun --nproc_per_node 2 -m fairseq_stablemoe.launch DATA ... --cpu
"""

from .cli.train import cli_main

if __name__ == "__main__":
    cli_main()

"""Expert parallelism over fairseq's data-parallel processes.

:mod:`.expert_parallel` places the experts on the processes (:class:`~.expert_parallel.ExpertShard`),
exchanges tokens between them (all-to-all) and reduces the replicas' gradients; :mod:`.torchrun` reads
the job torchrun started as fairseq's ``distributed_training`` settings. Imports torch and fairseq only:
the bottom layer of the package.
"""

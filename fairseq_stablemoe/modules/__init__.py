"""The MoE layer and its parts, as megablocks' ``layers/``.

:mod:`.router` (affinities), :mod:`.dispatch` (sort tokens by expert), :mod:`.experts` and
:mod:`.expert_threads` (the expert networks and their backends), :mod:`.moe_layer` (the layer all types
share), :mod:`.stablemoe_layer` and :mod:`.baseline_layers` (the routing types), :mod:`.moe_types`
(``--moe-type`` -> class), :mod:`.options` (the options and their defaults), :mod:`.routing_counts`
(exact distillation's counts), :mod:`.health` (collapse warning). Imports :mod:`..distributed` only, never
models, checkpoints, hooks or tools.
"""

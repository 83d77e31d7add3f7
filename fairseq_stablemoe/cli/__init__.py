"""The console tools: ``stablemoe-train`` (:mod:`.train`), ``stablemoe-consolidate`` (:mod:`checkpoints.consolidation`),
``stablemoe-fluctuation`` (:mod:`.fluctuation`), ``stablemoe-routing-summary`` (:mod:`.routing_summary`).

Each has ``build_parser()``/``run(args)``/``cli_main()``. The top layer: imports anything below it.
"""

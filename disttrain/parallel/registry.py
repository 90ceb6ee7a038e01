"""The gradient strategies by name (``comm.impl``): the one place a strategy's name is listed.

A strategy is one module in parallel/ with a :class:`~disttrain.parallel.sync.GradSync` subclass whose constructor
takes ``(module, spec, env, cfg, loss_divisor)``, plus one line here. strategies.py builds it (after the one
single-process shortcut); the schema reads the names for ``comm.impl``. This module imports nothing.
"""

STRATEGIES = {  # name -> "module:class" in disttrain.parallel, imported when the strategy is built
    "ddp": "ddp:DDPSync",
    "allreduce": "allreduce:AllReduceSync",
    "fsdp": "fsdp:FSDPSync",
}
STRATEGY_NAMES = tuple(STRATEGIES)

__all__ = ["STRATEGIES", "STRATEGY_NAMES"]

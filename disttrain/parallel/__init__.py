"""Everything that talks to other ranks: the process group and device (env.py), local launching (launch.py,
agentlog.py), the gradient strategies behind one interface (sync.py; ddp.py, allreduce.py, fsdp.py; their names in
registry.py, built by strategies.py), small collectives (collectives.py), SyncBatchNorm (syncbn.py) and the blocks
that fsdp shards and recomputation replays (blocks.py).

Only this package (and the demos' own experiments) calls torch.distributed.
"""

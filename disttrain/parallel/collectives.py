"""Gradient averaging: DistributedDataParallel, an explicit bucketed all-reduce, and reduce modes.

The single-device gradient on a global batch of B samples is g = (1/B) sum_i grad l_i. Rank r holds
b_r of the samples (sum b_r = B; B=30 over W=4 gives 8, 8, 7, 7).

**mean (the default, exact).** Every rank divides its *summed* loss by the global B before backward, so it
holds (1/B) sum_{i in r} grad l_i, and the gradients are *summed* across ranks: the result is exactly g, for
any split. Equivalently, each rank's local mean loss is weighted by b_r/B (W*b_r/B under DDP's built-in
1/W average): the count-weighted mean. DDP's plain average of local-mean gradients, (1/W) sum_r g_r with
g_r = (1/b_r) sum_{i in r} grad l_i, equals g only when every b_r = B/W.

Why the weight goes into the loss, before backward, rather than into the reduction afterwards: layers that
couple ranks inside backward (SyncBatchNorm sums dy over the global batch) must see every rank's dy on the
same scale, that of the global objective (1/B) sum_i l_i. Weighting each rank's gradient after its
backward would mix dy's scaled by different 1/b_r inside those sums.

**sum, max and avg (contrast modes).** Each rank backpropagates its local mean loss (the gradient g_r a single
process computes on its slice) and the reduction is:
    sum: sum_r g_r        = W * g for equal splits (a W-times larger step for SGD, not for Adam)
    max: max_r g_r        elementwise; not the gradient of anything
    avg: (1/W) sum_r g_r  torch DDP's own averaging (all-reduce SUM, then divide by W): equal to g
                          only when every b_r = B/W (B=32 over W=4), not for uneven slices (B=30)
so the difference between averaging, summing and taking the maximum is visible in `disttrain verify`.

Both implementations issue one all_reduce per gradient bucket with the op from :data:`_OPS`, so "ddp" and
"allreduce" can only differ in how gradients are grouped into buckets, never in what is computed.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from .env import DistEnv



def sum_over_ranks(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place, with one all_reduce (unchanged without a process group).

    For merges weighted by what each rank holds (sums and counts, not per-rank means): pack the sums and
    the counts into one tensor, so one collective carries both and the weighting is exact.
    """
    if env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor



def broadcast_from_main(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank (pickled; for start-up state such as a loaded checkpoint).

    One rank reads the file and the others receive it, so every rank resumes from the same checkpoint even
    when only rank 0's node can see the run directory, and a decision rank 0 makes (which file, or an error)
    is made once for the whole group.
    """
    if not env.is_distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.backend == "nccl" else None)
    return box[0]

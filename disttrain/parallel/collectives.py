"""Small collectives outside the gradient reduction: a sum over ranks and rank 0's object on every rank.

Merges weighted by what each rank holds (sums and counts, never per-rank means) pack their values into one tensor,
so one all_reduce carries both and the weighting is exact.
"""

from __future__ import annotations

from collections.abc import Callable

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



def sum_over_ranks_async(tensor: torch.Tensor, env: DistEnv) -> Callable[[], torch.Tensor]:
    """Start summing ``tensor`` over all ranks, in place; the returned function waits and returns it.

    For a small value needed a little later (a step's token count, run/loss.py): the collective's latency hides
    behind the work done before the wait. ``tensor`` must be on the compute device (NCCL has no CPU tensors).
    """
    if not env.is_distributed:
        return lambda: tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return tensor

    return wait



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

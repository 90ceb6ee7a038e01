"""Small collectives outside the gradient reduction: a sum over ranks, the global count of samples or tokens, and
rank 0's object on every rank.

Merges weighted by what each rank holds (sums and counts, never per-rank means) pack their values into one tensor,
so one all_reduce carries both and the weighting is exact.
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


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the group's size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live for a collective of ``group``: the CPU whenever the group has gloo (also
    ``cpu:gloo,cuda:nccl``), else the current accelerator (a group of NCCL alone has no CPU tensors)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def global_count(local_count: int | torch.Tensor, *, device: torch.device | str | None = None,
                 group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The number of samples (or tokens, or non-ignored targets) over all ranks: one all_reduce of an int64.

    Divide this rank's *summed* loss by it and sum the gradients (:func:`~disttrain.parallel.ddp.register_sum_hook`):
    the exact gradient of the global mean, whatever each rank holds (padding, uneven slices). Returned as a tensor
    on ``device`` (default: ``local_count``'s device when it is a tensor, else the CPU), so dividing a loss by it
    needs no host sync; the collective itself runs on a device the group's backend accepts (NCCL alone has no CPU
    tensors) and the result is moved. Without a process group: ``local_count`` itself, as a tensor.
    """
    if device is None:
        device = local_count.device if isinstance(local_count, torch.Tensor) else torch.device("cpu")
    count = torch.as_tensor(local_count).detach()
    if count.is_floating_point() or count.numel() != 1:
        raise ValueError(f"global_count: a count is one integer, got {count.dtype} of shape {tuple(count.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        return count.to(device=device, dtype=torch.int64).reshape(())
    wire = count.to(device=collective_device(group), dtype=torch.int64).reshape(1).clone()
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
    return wire.reshape(()).to(device)


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


__all__ = ["sum_over_ranks", "rank_and_world_size", "collective_device", "global_count", "broadcast_from_main"]

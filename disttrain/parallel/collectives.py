"""Small collectives outside the gradient reduction: a sum over ranks, the global count of samples or tokens,
rank 0's object or state on every rank, and the one helper that makes the buffers they send.

Merges weighted by what each rank holds (sums and counts, never per-rank means) pack their values into one tensor,
so one all_reduce carries both and the weighting is exact.

**Where a buffer lives.** On CUDA the group is ``cpu:gloo,cuda:nccl`` (env.py): a CPU tensor would still be
legal (gloo carries it), but it would leave the NCCL stream and cost a host round trip. So every buffer that
disttrain itself creates for a collective (a stop request, metric sums) is made by :func:`control_buffer` on the
compute device; everything else a collective sends derives from parameters, gradients or activations, which are
on that device already. tests/test_devices.py checks this on the CPU by treating every tensor made without an
explicit device as a host tensor and refusing it at every collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .env import DistEnv


def control_buffer(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` zeros on ``device``: the one way disttrain makes a buffer of its own for a collective."""
    return torch.zeros(n, dtype=dtype, device=device)


def sum_over_ranks(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place, with one all_reduce (unchanged without a process group).

    For merges weighted by what each rank holds (sums and counts, not per-rank means): pack the sums and
    the counts into one tensor, so one collective carries both and the weighting is exact.
    """
    if env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wait_for_every_rank(group: dist.ProcessGroup | None = None) -> None:
    """Return once every rank of ``group`` (default: the world) has called this: one barrier, nothing without a
    process group. For ordering a side effect of one rank (a removal on disk) before the others act on it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the group's size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: dist.ProcessGroup | None = None, prefer: torch.device | None = None) -> torch.device:
    """Where a tensor must live for a collective of ``group``: ``prefer`` (the value's own device) when the group's
    backend takes it, so a count made on the GPU stays there and travels through NCCL; else the CPU when the group
    has gloo (also ``cpu:gloo,cuda:nccl``), else the current accelerator (NCCL alone has no CPU tensors)."""
    backend = str(dist.get_backend(group))
    if prefer is not None and (prefer.type == "cuda" and "nccl" in backend or prefer.type == "cpu" and "gloo" in backend):
        return prefer
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def global_count(local_count: int | torch.Tensor, *, device: torch.device | str | None = None,
                 group: dist.ProcessGroup | None = None,
                 async_op: bool = False) -> torch.Tensor | Callable[[], torch.Tensor]:
    """The number of samples (or tokens, or non-ignored targets) over all ranks: one all_reduce of an int64.

    Divide this rank's *summed* loss by it and sum the gradients (:func:`~disttrain.parallel.ddp.register_sum_hook`):
    the exact gradient of the global mean, whatever each rank holds (padding, uneven slices). Returned as a tensor
    on ``device`` (default: ``local_count``'s device when it is a tensor, else the CPU), so dividing a loss by it
    needs no host sync; the collective runs on the count's own device where the group's backend takes it (a count
    on the GPU goes through NCCL), else on one it accepts, and the result is moved. Without a process group:
    ``local_count`` itself, as a tensor.

    ``async_op=True`` returns a function instead, which waits for the collective and returns the count: start it
    early, and the collective's latency hides behind the work done before the wait (the trainer starts a step's
    token count before the first forward and waits in the first backward: run/loss.py).
    """
    if device is None:
        device = local_count.device if isinstance(local_count, torch.Tensor) else torch.device("cpu")
    count = torch.as_tensor(local_count).detach()
    if count.is_floating_point() or count.numel() != 1:
        raise ValueError(f"global_count: a count is one integer, got {count.dtype} of shape {tuple(count.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        result = count.to(device=device, dtype=torch.int64).reshape(())
        return (lambda: result) if async_op else result
    wire = count.to(device=collective_device(group, count.device), dtype=torch.int64).reshape(1).clone()
    work = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    if not async_op:
        return wire.reshape(()).to(device)

    def wait() -> torch.Tensor:
        work.wait()
        return wire.reshape(()).to(device)

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
    # The pickled bytes travel as a byte tensor on the compute device (NCCL on CUDA, gloo on the CPU).
    dist.broadcast_object_list(box, src=0, device=env.device)
    return box[0]


class _Slot:
    """Where a tensor stood in a state broadcast by :func:`broadcast_state_from_main`."""

    def __init__(self, index: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.index, self.shape, self.dtype = index, shape, dtype


def _split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_state_from_main(state: Any, env: DistEnv) -> Any:
    """Rank 0's ``state`` (nested dicts and lists of CPU tensors and plain values, such as a checkpoint's model and
    optimizer state) on every rank, as CPU tensors.

    The structure (keys, scalars, each tensor's shape and dtype) is pickled once and small; then each tensor is
    broadcast on its own, on the compute device, so no rank ever holds the pickled whole state, and the bytes of a
    large model travel through NCCL rather than through a pickle. One collective per tensor: start-up cost only.
    """
    if not env.is_distributed:
        return state
    tensors: list[torch.Tensor] = []
    skeleton = broadcast_from_main(_split(state, tensors) if env.is_main else None, env)
    slots: list[_Slot] = []
    _slots(skeleton, slots)  # in the order _split numbered them
    received = []
    for slot in slots:
        if env.is_main:
            buf = tensors[slot.index].to(env.device).contiguous()  # no copy on the CPU
        else:
            buf = torch.empty(slot.shape, dtype=slot.dtype, device=env.device)
        dist.broadcast(buf, src=0)
        if not env.is_main:
            received.append(buf.cpu())  # as rank 0 holds it: the checkpoint's CPU tensors
    return state if env.is_main else _fill(skeleton, received)


def _slots(obj: Any, slots: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, slots)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, slots)


__all__ = ["sum_over_ranks", "wait_for_every_rank", "rank_and_world_size", "collective_device", "global_count",
           "broadcast_from_main", "broadcast_state_from_main", "control_buffer"]

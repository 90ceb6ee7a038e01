"""Small collectives outside the gradient reduction: a sum over ranks, rank 0's object or state on every rank, and
the one helper that makes the buffers they send.

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

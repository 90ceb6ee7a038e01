"""A CPU stand-in for "this tensor is on the host, not on the compute device", for tests/test_devices.py.

On a CUDA run the compute device is cuda:LOCAL_RANK while a tensor made without ``device=`` lands on the CPU, and a
CPU tensor in an NCCL collective fails the step (the fsdp stop request did). On this CPU-only machine both are
``cpu``, so a check of ``tensor.device`` would pass. Instead, :class:`HostTensors` marks every tensor that a factory
(torch.zeros, torch.tensor, ...) makes without an explicit device as a *host* tensor, follows the mark through
every torch operation (a clone, a cat, an in-place write of a host tensor keep it; a ``.to(device)`` / ``.cuda()``
with an explicit device clears it), and :func:`recording_collectives` refuses a host tensor at every collective
of torch.distributed. Gradients (made by autograd), parameters and activations (moved with ``.to(device)``), and
buffers made by :func:`disttrain.parallel.collectives.control_buffer` (an explicit device) pass.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace, torch.scalar_tensor}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "reduce_scatter_single", "all_to_all_single", "all_gather_single", "reduce",
               "gather", "scatter")


class HostTensors(TorchFunctionMode):
    """Marks tensors made without an explicit device, and what is computed from them (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (a weak reference, where the mark began): a tensor's == is elementwise, so no set of tensors, and a
        # reused id finds a dead reference
        self.host: dict[int, tuple[weakref.ref, str]] = {}

    def is_host(self, t: torch.Tensor) -> bool:
        entry = self.host.get(id(t))
        return entry is not None and entry[0]() is t

    def origin(self, t: torch.Tensor) -> str:
        return self.host[id(t)][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            if kwargs.get("device") is None:
                self._mark(out, _caller())
            return out
        explicit = kwargs.get("device") is not None or (len(args) > 1 and not isinstance(args[1], torch.dtype))
        if func in MOVES and explicit:  # an explicit device (or another tensor's): what the code asked for
            self.host.pop(id(out), None)  # (on the CPU, .to("cpu") returns the tensor itself)
            return out
        if func is torch.Tensor.cpu:
            self._mark(out, _caller())
            return out
        if args and out is args[0] and getattr(func, "__name__", "").endswith("_"):
            return out  # in place (copy_, add_, ...): the tensor stays where it was, whatever it read
        inputs, _ = tree_flatten((args, kwargs))
        source = next((t for t in inputs if isinstance(t, torch.Tensor) and self.is_host(t)), None)
        if source is not None:
            self._mark(out, self.origin(source))
        return out

    def _mark(self, out: Any, origin: str) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = (weakref.ref(t), origin)


def _caller() -> str:
    """The innermost frame outside torch and this file: where the host tensor was made."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("devicecheck.py"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def recording_collectives(mode: HostTensors, sent: list[tuple[str, tuple[int, ...]]]) -> Iterator[None]:
    """Patch torch.distributed's collectives to record what they send and raise on a host tensor."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def collective(*args, **kwargs):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    if mode.is_host(t):
                        raise AssertionError(f"dist.{name} sent a host tensor of shape {tuple(t.shape)} (made without "
                                             f"the compute device at {mode.origin(t)}): NCCL would reject it")
                    sent.append((name, tuple(t.shape)))
            return fn(*args, **kwargs)
        return collective

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        with mode:
            yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)

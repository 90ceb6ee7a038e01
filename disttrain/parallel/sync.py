"""The gradient strategy interface (:class:`GradSync`), the reduce modes, and the single-process case.

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

The strategies (one module each: ddp.py, allreduce.py, fsdp.py; names in registry.py, built by strategies.py)
reduce with the op and divisor of :class:`ReduceSpec`, so they can differ only in how gradients are grouped and
sharded, never in what is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.files import cpu_copy
from ..optim.clip import clip_gradients, gradient_norm
from ..config.schema import ClipConfig
from .env import DistEnv
from .collectives import broadcast_state_from_main
from ..errors import ConfigError


# mean is a SUM: the 1/B normalisation already happened in the loss (see the module docstring).
# avg is a SUM followed by a division by W (ReduceSpec.divisor), as DDP does without a hook.
_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.SUM}


@dataclass
class ReduceSpec:
    """How gradients are reduced across ranks."""

    mode: str  # mean | sum | max | avg
    group: dist.ProcessGroup | None = None
    world_size: int = 1
    control: torch.Tensor | None = None  # GradSync.control, carried by the last bucket of each step
    reduced_control: torch.Tensor | None = None  # and what came back

    @property
    def op(self) -> dist.ReduceOp:
        return _OPS[self.mode]

    @property
    def divisor(self) -> int:
        """The reduced gradient is divided by this after the collective: W for avg, else 1."""
        return self.world_size if self.mode == "avg" else 1


def pack(flat: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """``flat`` with the control values appended (in its dtype: small integers are exact in any float type)."""
    return torch.cat([flat, control.to(device=flat.device, dtype=flat.dtype)])


def unpack(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient part of ``packed`` (a view) and its ``n`` reduced control values (a copy)."""
    return packed[:-n], packed[-n:].clone()


class GradSync:
    """Everything the trainer does that depends on how gradients are communicated, behind one interface.

    A strategy wraps the model (``module``: call forward on it; ``model``: the user's model inside), says how
    the summed loss is scaled before backward (``loss_divisor``), keeps micro-batches local (``no_sync``),
    reduces the gradients (``sync``), measures and clips the global gradient (``clip``), and moves the training
    state in and out of the ranks (``state_dict``, ``load_state_dict``). The step function and the loop never
    ask which strategy they hold. This base class is the replicated case: after ``sync`` every rank holds the
    whole reduced gradient and the same parameters and optimizer state.
    """

    module: nn.Module  # call forward on this
    loss_divisor: int  # divide this rank's *summed* loss by this before backward: B (mean) or b_r
    # True (comm.reduce: mean over ranks): a count known only at run time (target tokens, run/loss.py) is summed
    # over ranks before it divides the loss; False: this rank's own count (contrast modes, or one process).
    global_loss_divisor: bool = False
    env: DistEnv | None = None  # None: no process group
    # A few small non-negative values of this rank (a stop request, see stop.py) that travel in the step's gradient
    # reduction, with its op, read when the step's last bucket is packed: after the step ``reduced_control`` holds
    # the same values on every rank, > 0 exactly where some rank's were (a strategy whose reduction cannot carry them
    # reduces them in sync() with a small collective of its own: fsdp). None: nothing to carry.
    control: torch.Tensor | None = None
    reduced_control: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        """The model without any wrapper (what a checkpoint stores)."""
        return self.module

    def sync(self) -> None:
        """Make every rank's .grad the reduced gradient. Here: one process, nothing to reduce."""
        if self.control is not None:
            self.reduced_control = self.control.clone()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally, without communication."""
        yield

    def clip(self, cfg: ClipConfig) -> torch.Tensor:
        """Clip the reduced gradient per ``cfg``; return the global gradient norm before clipping (a 0-dim tensor,
        not read back here: the step reads it with the rest of what it needs, once).

        Every rank holds the whole reduced gradient (the same on all ranks), so the local norm *is* the global
        one and every rank takes the same decision, with no collective; sharded gradients (fsdp) need one
        all_reduce of the shards' parts (clip.py).
        """
        return clip_gradients(self.model.parameters(), cfg)

    def clip_local(self, cfg: ClipConfig) -> None:
        """Clip this rank's gradient before the reduction: the wrong order, for demonstration
        (``clip.before_average``)."""
        clip_gradients(self.model.parameters(), cfg)

    def gradient_norm(self, norm_type: float) -> torch.Tensor:
        """The global gradient norm, without clipping (a 0-dim tensor)."""
        return gradient_norm(self.model.parameters(), norm_type)

    def state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
        """{"model": ..., "optimizer": ...} (the optimizer's only when given) as CPU tensors on rank 0, None on the
        others. Called on every rank: a sharded strategy gathers here; replicated ranks hold the same state, so
        rank 0 copies its own."""
        if self.env is not None and not self.env.is_main:
            return None
        state = {"model": cpu_copy(self.model.state_dict())}
        if optimizer is not None:
            state["optimizer"] = cpu_copy(optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any] | None, optimizer: torch.optim.Optimizer) -> None:
        """Load ``state`` (from :meth:`state_dict`, read by rank 0; None on the other ranks) on every rank.
        Replicated: rank 0's state is broadcast (its structure once, then tensor by tensor on the compute device),
        so every rank resumes from the file rank 0 read."""
        if self.env is not None:
            state = broadcast_state_from_main(state, self.env)
        error = check_model_state(self.model, state["model"])
        if error:  # the same state on every rank: every rank stops here
            raise ConfigError(error)
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # momentum / Adam moments, and the current lr


class LocalSync(GradSync):
    """One process, no group: the local gradient is already the global one."""

    def __init__(self, module: nn.Module, loss_divisor: int):
        self.module = module
        self.loss_divisor = loss_divisor


def check_model_state(model: nn.Module, state: dict[str, Any]) -> str | None:
    """Why ``state`` (a checkpoint's whole model state) cannot be loaded into ``model``, or None.

    Every strategy saves whole tensors (a sharded one gathers them), so a checkpoint cannot lack one rank's
    shards; what can go wrong is a file whose tensors are missing, extra, or of another shape.
    """
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(ours.keys() - state.keys())
    extra = sorted(state.keys() - ours.keys())
    if missing or extra:
        parts = ([f"lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []) + (
            [f"has unknown {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}"] if extra else [])
        return f"checkpoint model state {' and '.join(parts)}: not a complete state of this model"
    for key, shape in ours.items():
        if tuple(state[key].shape) != shape:
            return f"checkpoint model state: {key} has shape {tuple(state[key].shape)}, the model's is {shape}"
    return None

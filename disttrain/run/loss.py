"""The losses of ``train.loss``, and what a step's summed loss is divided by before backward.

Every loss is *summed* over what it counts (samples, or target tokens) and divided by one count, the same on every
rank for ``comm.reduce: mean``; the strategy then sums gradients (parallel/sync.py). The count is:

- samples (``cross_entropy``, ``mse``): known before the run, the global batch size B (``GradSync.loss_divisor``);
- target tokens (``token_cross_entropy``): the logits are (N, T, V), the targets (N, T) integers, -100 ignored. The
  step's objective is sum of per-token cross entropies over every non-ignored target of the global batch / their
  number over the whole global batch (all ranks, all micro-batches). That number is known only once every rank
  has its batch: sequences differ in length, and a rank or a micro-batch may hold no target at all.

**How the token count reaches every rank: one small all_reduce before backward, overlapped with the first
forward.** All micro-batches of the step are in memory when the step starts, so each rank counts its targets at
once and starts an asynchronous all_reduce of that one integer (a tensor on the compute device: NCCL has no CPU
tensors), then runs the first micro-batch's forward; the first backward waits for it. Why not the alternatives:

- counting from the data would make every rank read the targets of the whole global batch (W times the I/O);
- summing unscaled losses and dividing the gradients after the reduction (the count riding in the last bucket,
  as the stop request does) saves the collective but needs every strategy to carry it (FSDP's reduce-scatter
  cannot), multiplies fp16 gradients by the token count before loss scaling can react, and adds a pass over
  every gradient. With the count first, every rank backpropagates the exact global objective from the start:
  layers that couple ranks in backward (SyncBatchNorm's global sums of dy) see one consistent scale, clipping
  sees the correctly scaled gradient, and fp16 loss scaling, fsdp and accumulation need nothing new.

The contrast modes (``comm.reduce`` sum / max / avg) divide by this rank's own count, as with samples: ``avg`` is
then DDP's average of per-rank token means, the normalisation Hugging Face fixed in 2024 (transformers #34242).

``train.token_weighting`` adds two contrasts: ``micro_batch_mean`` divides each micro-batch by its own count times
the accumulation steps k (with ``comm.reduce: avg``: the mean of per-micro-batch token means, what transformers
did before PR #34191); ``sequence_mean`` sums each sequence's token mean and divides by the samples, like a
per-sample loss (exact across ranks, but another objective: a short sequence's tokens weigh more).

A global batch without any target token has no mean: its gradient is zero here (the count is clamped to 1, no
NaN), and the step is named when the metrics are reduced (observe/metrics.py), which ends the run with exit 1.

``causal_lm`` is ``token_cross_entropy`` with Hugging Face's labels: ``labels`` as the data gives them (usually
``labels = input_ids``, -100 at padding), the logits at position t scored against the label at t + 1
(:func:`loss_targets`). Everything above then holds for the shifted targets: the count is the number of shifted
non-ignored targets over all ranks and micro-batches, so a sequence of n labelled tokens contributes n - 1, and
the step's loss is what transformers' Trainer computes with ``average_tokens_across_devices=True`` when told the
labels' shift (without it, transformers 5.25 counts the unshifted labels: 125 instead of 109 on one padded batch).
The model's output may be the logits or anything carrying them as ``.logits`` (a transformers ``ModelOutput``)
or ``["logits"]`` (models/calling.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config.schema import TOKEN_LOSSES
from ..data.named import IGNORE_INDEX
from ..models.calling import logits_of
from ..parallel.collectives import global_count
from ..parallel.sync import GradSync


def loss_targets(kind: str, target: torch.Tensor) -> torch.Tensor:
    """What the logits at each position are scored against. ``causal_lm``: Hugging Face's unshifted labels
    (N, T) moved one position left, the last position ignored, so position t predicts label t + 1 and the
    targets keep the logits' shape (N, T); every other loss: ``target`` itself."""
    if kind != "causal_lm":
        return target
    return F.pad(target[:, 1:], (0, 1), value=IGNORE_INDEX)


def summed_loss(kind: str, output: Any, target: torch.Tensor, weighting: str = "tokens") -> torch.Tensor:
    """The sum over the batch of per-sample losses (``cross_entropy``, ``mse``: a sample is a row of ``target``)
    or of per-token losses (``token_cross_entropy``: every target that is not -100; ``causal_lm``: every label
    after the first of its sequence that is not -100, scored by the logits one position earlier).

    mse: a sample's loss is the mean squared error over its outputs, so the logged global mean loss
    (sum over samples / samples) is torch's ``mse_loss`` on the global batch.
    """
    output, target = logits_of(output), loss_targets(kind, target)
    if output.dtype in (torch.float16, torch.bfloat16):  # autocast's output: the loss is summed in float32
        output = output.float()
    if kind == "mse":
        return F.mse_loss(output, target, reduction="sum") / target.shape[1:].numel()
    if kind in TOKEN_LOSSES and weighting == "sequence_mean":  # each sequence's token mean (0 without targets)
        per_token = F.cross_entropy(output.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none").view(target.shape)
        return (per_token.sum(1) / (target != IGNORE_INDEX).sum(1).clamp_min(1)).sum()
    if kind in TOKEN_LOSSES:  # (N, T, V) logits, (N, T) targets; no target at all sums to 0
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(output, target, reduction="sum")


def target_count(targets: list[torch.Tensor], kind: str = "token_cross_entropy") -> torch.Tensor:
    """The number of non-ignored targets of ``kind`` in ``targets`` (``causal_lm``: after the shift) as an int64
    tensor on their device: no host sync."""
    return sum((loss_targets(kind, y) != IGNORE_INDEX).sum() for y in targets)


class LossDivisor:
    """What this rank divides each micro-batch's summed loss by, for one step.

    Samples: ``sync.loss_divisor`` (B, or b_r in the contrast modes). Tokens: the step's global target count
    (``comm.reduce: mean``, summed over ranks asynchronously from construction until :meth:`value` is first
    called), or this rank's own (contrast modes); ``local_count`` is this rank's, for the metrics.
    """

    def __init__(self, kind: str, sync: GradSync, micro_batches: list[tuple], weighting: str = "tokens"):
        self.local_count: torch.Tensor | None = None
        self._per_micro_batch: list[torch.Tensor] | None = None
        if kind not in TOKEN_LOSSES or weighting == "sequence_mean":  # counted in samples
            self._value: torch.Tensor | int = sync.loss_divisor
            self._wait: Callable[[], torch.Tensor] | None = None
            return
        self.local_count = target_count([y for _, y, *_ in micro_batches], kind)
        if weighting == "micro_batch_mean":  # the contrast: each micro-batch's own mean, / k
            k = len(micro_batches)
            self._per_micro_batch = [target_count([y], kind).clamp_min(1) * k for _, y, *_ in micro_batches]
        if sync.global_loss_divisor:  # started now, so it travels while the first micro-batch runs forward
            self._wait = global_count(self.local_count, async_op=True)
        else:
            self._wait = lambda: self.local_count

    def value(self, micro_batch: int = 0) -> torch.Tensor | int:
        """The divisor of micro-batch ``micro_batch`` (the first call waits for the count's all_reduce)."""
        if self._per_micro_batch is not None:
            return self._per_micro_batch[micro_batch]
        if self._wait is not None:
            # Clamped: a step without targets has a zero summed loss, so a zero gradient rather than 0/0.
            self._value, self._wait = self._wait().clamp_min(1), None
        return self._value


__all__ = ["IGNORE_INDEX", "TOKEN_LOSSES", "loss_targets", "summed_loss", "target_count", "LossDivisor"]

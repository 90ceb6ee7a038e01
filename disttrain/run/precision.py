"""Mixed precision: autocast for forward and loss, and fp16 loss scaling that every rank agrees on.

``train.precision``: fp32 (no autocast), bf16 or fp16. Parameters stay in train.dtype (float32): they are the
master weights, their gradients are float32 (autocast casts a *copy* of each weight to half precision for a matmul,
and backward accumulates into the float32 leaf), and so is the optimizer state. So the count-weighted reduction
(parallel/sync.py) sums float32 gradients exactly as in an fp32 run. What changes is inside forward and backward: matmuls and
convolutions round their inputs and outputs to 8 (bf16) or 11 (fp16) significant bits. SyncBatchNorm widens its
input to float32 and merges in float64 (syncbn.py), and the loss is computed in float32.

Why W ranks differ from one device at all: per-sample forward values are the same whether a batch runs whole or in
slices, but each rank's *partial* weight gradient (a sum over its slice) is rounded to half precision by the matmul
before the float32 all-reduce, where one device rounds the whole sum once. That is a rounding of ~2^-8 (bf16) per
step, hence the wider tolerances of verify/whole.py.

**fp16 loss scaling.** fp16 has 5 exponent bits: small gradients underflow to zero. The summed loss is multiplied
by a scale s (a power of two) before backward and the gradient by 1/s afterwards; a step whose gradient overflowed
(inf/nan) is skipped and s halves; after ``growth_interval`` finite steps in a row s doubles (torch's GradScaler
rules). torch.amp.GradScaler checks each rank's *local* gradient for inf, so ranks could disagree: one skips, the
others step, and their parameters and scales part for good. Here the check is made on the *reduced* gradient:

- Unscaling after the reduction rather than before is exact: s is the same power of two on every rank, so
  (sum_r s g_r) / s == sum_r g_r bit for bit (multiplying by a power of two only moves exponents; the float32
  gradients are far from float32's overflow and underflow limits).
- An inf or nan on any rank enters the sum, so after the reduction every rank holds a non-finite gradient: the
  check is made on identical data, the decision is the same everywhere, and no extra collective (GradScaler's
  found_inf all-reduce) is needed. (comm.reduce=max, a contrast mode, also propagates an inf.)
- The scale's update depends only on that decision, so the scales stay equal on every rank, and a checkpoint
  (rank 0's copy) resumes on any world size.

**Overflow as one device would see it.** Where fp16 overflows is not the same for W ranks and one device: the
weight gradient of a linear or convolution layer leaves its fp16 matmul as a sum over the batch, rounded to fp16
(inf from 65520 up). One device sums the whole global batch there; a rank only its slice, which is smaller, and the
slices are added in float32 afterwards. Near the limit one device overflows and skips where W ranks do not (measured
before this rule: a step apart on W=4, and segment errors of 0.15 where the decisions parted). So a step also counts
as overflowed when a reduced, still scaled, gradient entry of such a layer reaches 65520: the reduced gradient *is*
the global batch's sum, so this is the test one device's matmul makes, whatever the world size or the number of
micro-batches. (Not covered: a rank's partial sum overflowing while the global sum, with other ranks' entries of the
opposite sign, would not; and half-precision matmuls outside nn.Linear / nn.Conv*.)

**TF32 and determinism on CUDA** (:func:`configure_numerics`). Ampere and later GPUs can run float32 matmuls and
convolutions in TF32 (10 mantissa bits, about 1e-3 relative, like fp16); torch leaves cuDNN convolutions in TF32
by default. disttrain sets both from ``train.tf32`` (default false: IEEE float32), a trajectory key whose verify
tolerance is fp16's (verify/whole.py). ``train.deterministic`` asks for bitwise repeatability on the same device:
``torch.use_deterministic_algorithms(True)``, cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, read
when cuBLAS starts) and cuDNN's deterministic, non-benchmarked kernels. Neither makes W ranks bitwise equal to one
device: their sums are grouped differently; verify judges that by its tolerance.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in fp16 (largest finite: 65504)
# Layers whose parameter gradients autocast computes in half precision, each a sum over the batch.
HALF_GRADIENT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d)


def configure_numerics(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """Set this process's float32 arithmetic for ``device`` (see the module docstring): TF32 on CUDA only as
    ``tf32`` allows it, and with ``deterministic`` torch's deterministic algorithms (on any device)."""
    if device.type == "cuda":
        mode = "tf32" if tf32 else "ieee"  # torch's fp32_precision API (not the legacy allow_tf32 flags)
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call of the run
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """Autocast to the half type of ``precision`` on ``device_type`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16; for fp32 and bf16 the identity (scale 1, never backs off).

    Every method is called on every rank with the same arguments after the reduction, so every rank holds the same
    state: no collective here.
    """

    growth_factor = 2.0
    backoff_factor = 0.5

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # finite steps since the scale last changed

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def overflows(self, model: nn.Module) -> torch.Tensor | None:
        """Whether the reduced, still scaled, gradient of a half-precision layer would overflow fp16 as one device's
        matmul over the global batch does (see the module docstring), as a 0-dim bool tensor on the gradients'
        device (None: nothing can overflow). Not read back here: the step reads it with the gradient norm, in its
        one host sync. Call after the reduction, before unscaling."""
        if not self.enabled:
            return None
        grads = [p.grad for m in model.modules() if isinstance(m, HALF_GRADIENT_LAYERS)
                 for p in m.parameters(recurse=False) if p.grad is not None]
        if not grads:
            return None
        largest = torch.stack(torch._foreach_norm(grads, float("inf"))).max()
        return largest >= FP16_OVERFLOW  # inf too; a nan is caught by the gradient norm

    def unscale_(self, params: Iterable[nn.Parameter]) -> None:
        """Divide every gradient by the scale (exact: a power of two). Call after the reduction."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After a step whose reduced gradient was finite (or not): GradScaler's growth and backoff rules."""
        if not self.enabled:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """None (a checkpoint without scaler state): keep the initial state."""
        if state is not None and self.enabled:
            self.scale = float(state["scale"])
            self.growth_tracker = int(state["growth_tracker"])


__all__ = ["AUTOCAST_DTYPES", "autocast", "LossScaler"]

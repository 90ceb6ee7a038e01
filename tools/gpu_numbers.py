"""The numbers of tools/gpu_check.sh that need a script (prints them; exits non-zero on an error or a failed check).

    python tools/gpu_numbers.py trainer   the trainer on cuda (W=1) in fp32/bf16/fp16 against the CPU float64 run
                                          (exit 1 when cuda and cpu part by more than verify's tolerance)
    python tools/gpu_numbers.py syncbn    disttrain's SyncBatchNorm against torch.nn.SyncBatchNorm on CUDA tensors
                                          in an NCCL group of one, and a float64 CPU reference
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from disttrain.config.parse import load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import run
from disttrain.verify.whole import relative_difference, state_difference, tolerance

BASE = ["model.name=cnn", "model.norm=syncbn", "model.hidden=16", "train.global_batch_size=32", "train.steps=10",
        "optim.lr=0.05", "data.num_samples=256", "train.checkpoint_every=0"]


def _train(device: str, dtype: str, precision: str, out: str) -> tuple[dict, list[float]]:
    cfg = load_config(None, [*BASE, f"train.device={device}", f"train.dtype={dtype}", f"train.precision={precision}",
                             f"train.out_dir={out}"])
    with distributed(device, 60.0) as env:
        result = run(cfg, env, console=False)
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}, result.losses


def trainer() -> int:
    """Exit status 1 when the cuda run of a precision is farther from the CPU run of the same precision than verify's
    tolerance for its 10 steps (fp32: TF32 off, as train.tf32=false sets it)."""
    summary, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        ref_state, ref_losses = _train("cpu", "float64", "fp32", f"{tmp}/ref")
        print(f"{'precision':<10} {'device':<6} {'param diff':>11} {'loss diff':>10}  (10 steps, vs the CPU "
              "float64 run)")
        for precision in ("fp32", "bf16", "fp16"):
            runs = {}
            for device in ("cuda", "cpu"):
                start = time.perf_counter()
                runs[device] = _train(device, "float32", precision, f"{tmp}/{device}-{precision}")
                state, losses = runs[device]
                diffs = state_difference(state, ref_state)
                loss = relative_difference(torch.tensor(losses), torch.tensor(ref_losses))
                print(f"{precision:<10} {device:<6} {max(diffs.values()):>11.2e} {loss:>10.2e}  "
                      f"({time.perf_counter() - start:.1f} s)")
            apart = max(state_difference(runs["cuda"][0], runs["cpu"][0]).values())
            limit = tolerance("float32", 10, precision)
            failed |= not apart <= limit  # (a NaN fails too)
            print(f"{precision:<10} cuda vs cpu in {precision}: {apart:.2e} (verify's per-step tolerance "
                  f"{tolerance('float32', 1, precision):.0e})")
            summary.append(f"{precision} {apart:.1e} (<= {limit:.0e})")
        print(f"cuda vs cpu after 10 steps, TF32 off (matmul {torch.backends.cuda.matmul.fp32_precision}, cuDNN conv "
              f"{torch.backends.cudnn.conv.fp32_precision}): {', '.join(summary)}")
    return 1 if failed else 0


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    bn = nn.BatchNorm2d(x.shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(w.double().cpu())
        bn.bias.copy_(b.double().cpu())
    xr = x.detach().double().cpu().requires_grad_()
    y = bn(xr)
    y.backward(dy.double().cpu())
    return {"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "mean": bn.running_mean,
            "var": bn.running_var}


def _one(impl: str, x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, dy: torch.Tensor, group) -> dict:
    from torch.nn.modules._functions import SyncBatchNorm as TorchFunction

    from disttrain.parallel.syncbn import _SyncBatchNormFunction

    c = x.shape[1]
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    xi = x.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    nbt = torch.zeros((), dtype=torch.long, device=x.device)
    if impl == "disttrain":
        y = _SyncBatchNormFunction.apply(xi, w, b, rm, rv, nbt, 1e-5, 0.1, group, "all_reduce")
    else:
        y = TorchFunction.apply(xi, w, b, rm, rv, 1e-5, 0.1, group, 1)
    y.backward(dy)
    return {"y": y.detach(), "dx": xi.grad, "dw": w.grad, "db": b.grad, "mean": rm, "var": rv}


def syncbn() -> int:
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    group = dist.group.WORLD
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for shape, offset in (((32, 64, 16, 16), 0.0), ((32, 64, 16, 16), 1e3)):
                x = (torch.randn(shape, device="cuda", generator=g) * 2 + offset).to(dtype)
                dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
                w0 = torch.rand(shape[1], device="cuda", generator=g) + 0.5
                b0 = torch.randn(shape[1], device="cuda", generator=g)
                ref = _reference(x, w0, b0, dy)
                row = [f"{str(dtype).split('.')[-1]:<9} mean {offset:>6g}"]
                for impl in ("disttrain", "torch"):
                    try:
                        got = _one(impl, x, w0, b0, dy, group)
                        worst = max(relative_difference(got[k].double().cpu(), ref[k]) for k in ref)
                        times = []
                        for _ in range(30):
                            torch.cuda.synchronize()
                            start = time.perf_counter()
                            _one(impl, x, w0, b0, dy, group)
                            torch.cuda.synchronize()
                            times.append(time.perf_counter() - start)
                        row.append(f"{impl}: max rel diff {worst:.2e}, {1e3 * statistics.median(times):.3f} ms")
                    except Exception as exc:  # e.g. a dtype torch's kernels refuse: print it, go on
                        row.append(f"{impl}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                print(" | ".join(row), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit({"trainer": trainer, "syncbn": syncbn}[sys.argv[1]]())

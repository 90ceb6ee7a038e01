"""Mixed precision: config errors, the fp16 loss scaler, SyncBatchNorm under autocast, one rank overflowing, and
resume / resize with the scaler's state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from disttrain.checkpoint.format import list_checkpoints, load_checkpoint
from disttrain.config import ConfigError
from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.run.precision import LossScaler
from disttrain.parallel.syncbn import SyncBatchNorm
from disttrain.run.train import Hook, Trainer
from tests.common import max_rel_diff

# A small MLP, B=31 (uneven over 2 and 3 ranks), fp16 with a scale that grows every 2 finite steps.
FP16 = ["train.global_batch_size=31", "data.num_samples=93", "train.steps=6", "train.device=cpu", "model.hidden=16",
        "train.precision=fp16", "train.loss_scale_growth_interval=2", "optim.lr=0.05", "model.norm=syncbn"]


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=fp16", "train.dtype=float64"],
     r"^train\.precision=fp16 needs train\.dtype=float32 \(the master weights\), got float64$"),
    (["train.precision=bf16", "train.dtype=float64"], r"^train\.precision=bf16 needs train\.dtype=float32"),
    (["train.precision=fp8"], r"train\.precision"),
    (["train.loss_scale=1000"], r"^train\.loss_scale: must be a power of two \(then scaling is exact\), got 1000"),
    (["train.loss_scale=0"], r"^train\.loss_scale: must be a power of two"),
    (["train.loss_scale_growth_interval=0"], r"^train\.loss_scale_growth_interval: must be >= 1, got 0$"),
    (["train.precision=fp16", "clip.nonfinite=error"],
     r"^clip\.nonfinite=error with train\.precision=fp16: loss scaling skips"),
])
def test_precision_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_precision_config_errors_exit_2(capsys):
    from disttrain.cli.main import main

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # float64
    assert main(["train", str(demo), "--set", "train.precision=fp16"]) == 2
    assert capsys.readouterr().err.strip().endswith("needs train.dtype=float32 (the master weights), got float64")


def test_loss_scaler_rules_and_state():
    scaler = LossScaler(True, 2.0 ** 4, growth_interval=2)
    seen = []
    for finite in (True, True, True, False, True, True):
        seen.append(scaler.scale)
        scaler.update(finite)
    assert seen == [16, 16, 32, 32, 16, 16] and scaler.scale == 32
    other = LossScaler(True, 1.0, growth_interval=2)
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict() == {"scale": 32.0, "growth_tracker": 0}
    off = LossScaler(False, 2.0 ** 4)
    off.update(False)
    assert off.scale == 1.0 and off.scale_loss(torch.tensor(3.0)) == 3.0


def test_overflow_is_judged_as_one_device_would_see_it():
    """A half-precision layer's reduced, scaled gradient entry of 65520 or more overflows one device's fp16 sum; a
    float32 layer's (BatchNorm) does not."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    scaler = LossScaler(True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].weight.grad.fill_(1e6)
    assert not scaler.overflows(model)
    model[0].bias.grad[1] = -65519.0
    assert not scaler.overflows(model)
    model[0].bias.grad[1] = -65520.0
    assert scaler.overflows(model)
    assert not LossScaler(False).overflows(model)


def test_master_weights_gradients_and_optimizer_state_stay_float32(tmp_path):
    cfg = load_config(None, [*FP16, "train.precision=bf16", "optim.name=adamw", "train.steps=2",
                             f"train.out_dir={tmp_path}"])
    with distributed("cpu") as env:
        result = Trainer(cfg, env, console=False).run()
    model = result.model
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
    moments = [v for state in result.optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.float32}


# -------------------------------------------------------------------------------- SyncBN under autocast

def _syncbn_under_autocast(dtype: torch.dtype) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    linear, layer = nn.Linear(6, 4), SyncBatchNorm(4)
    x = torch.randn(5 + rank, 6, generator=torch.Generator().manual_seed(rank)) * 3 + 50  # |mean| >> std
    with torch.autocast("cpu", dtype=dtype):
        h = linear(x)
        y = layer(h)
    y.float().sum().backward()
    return {"h": h.detach(), "y_dtype": y.dtype, "mean": layer.running_mean.clone(),
            "var": layer.running_var.clone(), "weight_grad_dtype": layer.weight.grad.dtype}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_syncbn_statistics_stay_float32_under_autocast(pools, dtype):
    per_rank = pools(2).run(_syncbn_under_autocast, dtype)
    h = torch.cat([r["h"] for r in per_rank]).double()  # the half-precision values the layer saw, exactly
    mean, var = h.mean(0), h.var(0, unbiased=True)
    for r in per_rank:
        assert r["h"].dtype == dtype and r["y_dtype"] == dtype
        assert r["mean"].dtype == torch.float32 and r["weight_grad_dtype"] == torch.float32
        # Statistics of the half values computed in float32 / merged in float64: float32 rounding only (a half
        # precision computation would be off by ~1e-3 relative).
        torch.testing.assert_close(r["mean"].double(), 0.1 * mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["var"].double(), 0.9 + 0.1 * var, rtol=1e-6, atol=0)


# -------------------------------------------------------------------------------- fp16 overflow on one rank

class Overflow(Hook):
    """At ``step``, on ``rank`` (every rank if None), the gradient of the first layer's output is multiplied by 1e6
    in backward: fp16 overflows (its largest value is 65504), as with a loss scale too large, and the gradient
    becomes inf/nan on that rank only. (Forward is untouched: the BN statistics stay finite.)"""

    def __init__(self, step: int, rank: int | None):
        self.step, self.rank, self.handle = step, rank, None
        self.scales: list[float] = []
        self.stepped: list[bool] = []

    def on_step_start(self, trainer, step) -> None:
        if step == self.step and self.rank in (None, trainer.env.rank):
            first = next(m for m in trainer.parts.sync.model.modules() if isinstance(m, nn.Linear))
            self.handle = first.register_forward_hook(lambda mod, args, out: out.register_hook(lambda g: g * 1e6)
                                                      and None)

    def on_step_end(self, trainer, step, result) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.scales.append(result.loss_scale)
        self.stepped.append(result.stepped)


def train_with_overflow(cfg_dict: dict, step: int, rank: int | None) -> dict:
    cfg = config_from_dict(cfg_dict)
    hook = Overflow(step, rank)
    with distributed("cpu") as env:
        result = Trainer(cfg, env, [hook], console=False).run()
    return {"state": {k: v.detach().clone() for k, v in result.model.state_dict().items()}, "scales": hook.scales,
            "stepped": hook.stepped, "skipped": result.skipped_steps}


def test_fp16_overflow_on_one_rank_skips_on_every_rank(pools, tmp_path):
    cfg = load_config(None, [*FP16, f"train.out_dir={tmp_path / 'dist'}"]).to_dict()
    per_rank = pools(3).run(train_with_overflow, cfg, 3, 1)  # rank 1 overflows at step 3
    expected_scales = [2.0 ** 16, 2.0 ** 16, 2.0 ** 17, 2.0 ** 17, 2.0 ** 16, 2.0 ** 16]  # grows, halves at 3
    for out in per_rank:
        assert out["stepped"] == [True, True, True, False, True, True]
        assert out["scales"] == expected_scales and out["skipped"] == 1
        for key in out["state"]:  # the ranks never parted
            assert torch.equal(out["state"][key], per_rank[0]["state"][key]), key
    from disttrain.observe.runlog import read_metrics

    records = read_metrics(tmp_path / "dist")
    assert [r["loss_scale"] for r in records] == expected_scales
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 1, 1]
    # One device overflowing at the same step follows the same trajectory, within fp16's tolerance.
    ref = train_with_overflow(load_config(None, [*FP16, f"train.out_dir={tmp_path / 'ref'}"]).to_dict(), 3, None)
    assert ref["scales"] == expected_scales and ref["stepped"] == per_rank[0]["stepped"]
    assert max_rel_diff(per_rank[0]["state"], ref["state"]) < 1e-2


# -------------------------------------------------------------------------------- resume and resize

def _train(cfg_dict: dict, resume: bool = False, stop_at: int | None = None) -> dict:
    cfg = config_from_dict(cfg_dict)
    with distributed("cpu") as env:
        result = Trainer(cfg, env, console=False).run(resume=resume, stop_at=stop_at)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_bitwise_under_every_precision(tmp_path, precision):
    overrides = [*FP16, f"train.precision={precision}", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    whole = _train(load_config(None, [*overrides, f"train.out_dir={tmp_path / 'a'}"]).to_dict())
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'b'}"]).to_dict()
    _train(cfg, stop_at=3)
    resumed = _train(cfg, resume=True)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    final = load_checkpoint(list_checkpoints(tmp_path / "b")[-1][1])
    assert final["scaler"] == load_checkpoint(list_checkpoints(tmp_path / "a")[-1][1])["scaler"]
    if precision == "fp16":
        assert final["scaler"] == {"scale": 2.0 ** 19, "growth_tracker": 0}  # 6 finite steps: doubled 3 times
    else:
        assert final["scaler"]["scale"] == 1.0


def test_fp16_resize_continues_the_scale(pools, tmp_path):
    """A checkpoint written by 2 ranks at step 3 continues on 3 ranks with the scale it held."""
    cfg = load_config(None, [*FP16, "train.checkpoint_every=3", "train.keep_checkpoints=0",
                             f"train.out_dir={tmp_path}"]).to_dict()
    pools(2).run(_train, cfg, False, 3)
    assert load_checkpoint(list_checkpoints(tmp_path)[-1][1])["scaler"] == {"scale": 2.0 ** 17, "growth_tracker": 1}
    resized = pools(3).run(_train, cfg, True)[0]
    ref = _train(load_config(None, [*FP16, f"train.out_dir={tmp_path / 'ref'}"]).to_dict())
    assert load_checkpoint(list_checkpoints(tmp_path)[-1][1])["scaler"] == {"scale": 2.0 ** 19, "growth_tracker": 0}
    assert max_rel_diff(resized, ref) < 1e-2  # (a NaN would fail this too)


# -------------------------------------------------------------------------------- the GPU check without a GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: tools/gpu_check.sh would run")
def test_gpu_check_fails_loudly_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
    done = subprocess.run([str(script)], env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu_check: FAILED: no CUDA GPU") and done.stderr.count("\n") == 1


# -------------------------------------------------------------------------------- verify knows the precision

# bf16, W=3 on B=31 (11/10/10), SGD at lr 0.05: a run that does not amplify rounding (the chaotic regime: docs/mixed-precision.md)
VERIFY = ["model.name=mlp", "model.hidden=32", "train.global_batch_size=31", "data.num_samples=124", "train.steps=12",
          "optim.lr=0.05", "train.device=cpu", "train.dtype=float32", "train.precision=bf16"]


def _train_into(cfg_dict: dict) -> None:
    _train(cfg_dict)


def test_bf16_run_is_judged_against_a_bf16_one_process_run(pools, tmp_path):
    from disttrain.verify.whole import compare_runs, run_tolerance

    ref_cfg = load_config(None, [*VERIFY, f"train.out_dir={tmp_path / 'ref'}"])
    _train_into(ref_cfg.to_dict())
    reports = {}
    fp16 = load_config(None, [*VERIFY, "train.precision=fp16", f"train.out_dir={tmp_path / 'fp16'}"])
    pools(3).run(_train_into, fp16.to_dict())
    _train_into(load_config(None, [*VERIFY, "train.precision=fp16", f"train.out_dir={tmp_path / 'fp16-ref'}"]
                            ).to_dict())
    reports["fp16"] = compare_runs(fp16, tmp_path / "fp16", tmp_path / "fp16-ref")
    for name, extra in (("correct", []), ("reduce=sum", ["comm.reduce=sum"]),
                        ("clip before average", ["comm.impl=allreduce", "clip.mode=norm", "clip.max_norm=0.1",
                                                 "clip.before_average=true"])):
        cfg = load_config(None, [*VERIFY, *extra, f"train.out_dir={tmp_path / name}"])
        pools(3).run(_train_into, cfg.to_dict())
        reference = ref_cfg if name != "clip before average" else load_config(
            None, [*VERIFY, "clip.mode=norm", "clip.max_norm=0.1", f"train.out_dir={tmp_path / 'ref-clip'}"])
        if name == "clip before average":
            _train_into(reference.to_dict())
        reports[name] = compare_runs(cfg, tmp_path / name, Path(reference.train.out_dir))
    tol = run_tolerance("float32", "bf16")
    correct = reports["correct"]
    assert correct.equivalent and correct.tolerance == tol and correct.dtype == "bf16, float32 weights"
    assert max(correct.max_param_rel_diff, correct.max_loss_rel_diff) > 1e-5  # bf16's rounding, not float32's
    for name in ("reduce=sum", "clip before average"):
        assert not reports[name].equivalent and reports[name].max_param_rel_diff >= 10 * tol, name
    assert reports["fp16"].equivalent and reports["fp16"].tolerance == run_tolerance("float32", "fp16")


def test_stepwise_reference_dtype_of_a_mixed_precision_run(tmp_path):
    from disttrain.verify.stepwise import verify_stepwise

    cfg = load_config(None, [*VERIFY, f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^--reference-dtype float64: a train\.precision=bf16 run is retrained in "
                                          r"its own precision"):
        verify_stepwise(cfg, tmp_path, reference_dtype="float64")

"""Learning-rate schedules against values computed here, independently of disttrain/schedule.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import disttrain

from disttrain.config import ConfigError, ScheduleConfig
from disttrain.config import load_config
from disttrain.optim.schedule import base_lr, build_scheduler, lr_at, schedule_args

WARMUPS = ["none", "linear", "constant", "exponential"]
DECAYS = ["constant", "cosine", "linear", "poly", "step"]
ETA, T, W, F0, MIN_LR = 0.8, 20, 5, 0.1, 0.05


def expected(s: int, warmup: str, decay: str) -> float:
    """The documented formulas, written out again (numpy, no shared code with the library)."""
    w = 0 if warmup == "none" else W
    if s < w:
        return {"linear": ETA * (F0 + (1 - F0) * s / w), "constant": ETA * F0,
                "exponential": ETA * np.power(F0, 1 - s / w)}[warmup]
    p = min(1.0, (s - w) / max(1, T - w))
    return {"constant": ETA,
            "cosine": MIN_LR + (ETA - MIN_LR) * 0.5 * (1 + np.cos(np.pi * p)),
            "linear": MIN_LR + (ETA - MIN_LR) * (1 - p),
            "poly": MIN_LR + (ETA - MIN_LR) * (1 - p) ** 2.0,
            "step": ETA * 0.5 ** sum(m <= s for m in (8, 14))}[decay]


def lr_of(step, cfg: ScheduleConfig) -> float:
    """The trainer's lr at ``step``: the public lr_at with the config's arguments."""
    return lr_at(step, base_lr=ETA, total_steps=T, **schedule_args(cfg))


def cfg_of(warmup: str, decay: str) -> ScheduleConfig:
    return ScheduleConfig(warmup=warmup, warmup_steps=W, warmup_start_factor=F0, decay=decay, min_lr=MIN_LR,
                          power=2.0, milestones=[8, 14], gamma=0.5)


@pytest.mark.parametrize("warmup, decay", list(itertools.product(WARMUPS, DECAYS)))
def test_every_combination_matches_the_formulas(warmup, decay):
    cfg = cfg_of(warmup, decay)
    for s in [0, 1, 2, W - 1, W, W + 1, 8, 11, 14, T - 1, T, T + 3]:
        assert lr_of(s, cfg) == pytest.approx(float(expected(s, warmup, decay)), rel=1e-12, abs=1e-15), s


def test_table_of_known_values():
    # Linear warmup from 0.1 * 0.8 over 5 steps, then cosine to 0.05 over the remaining 15.
    cfg = cfg_of("linear", "cosine")
    table = {0: 0.08, 1: 0.224, 2: 0.368, 3: 0.512, 4: 0.656, 5: 0.8, 12.5: None, 20: 0.05}
    for s, lr in table.items():
        if lr is not None:
            assert lr_of(int(s), cfg) == pytest.approx(lr, rel=1e-12)
    # Halfway through the decay (p = 0.5 at s = 12.5) cosine is at the midpoint: check the neighbours straddle it.
    assert lr_of(12, cfg) > (ETA + MIN_LR) / 2 > lr_of(13, cfg)
    step_cfg = cfg_of("none", "step")
    assert [lr_of(s, step_cfg) for s in (0, 7, 8, 13, 14, 19)] == pytest.approx(
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2], rel=1e-12)


@pytest.mark.parametrize("warmup", ["linear", "exponential"])
@pytest.mark.parametrize("decay", ["constant", "cosine", "linear", "poly"])
def test_warmup_is_monotone_and_continuous(warmup, decay):
    cfg = cfg_of(warmup, decay)
    lrs = [lr_of(s, cfg) for s in range(W + 1)]
    assert lrs[0] == pytest.approx(ETA * F0) and lrs[0] > 0  # step 0 is not zero
    assert all(a < b for a, b in zip(lrs, lrs[1:]))  # strictly increasing warmup
    assert lrs[W] == pytest.approx(ETA, rel=1e-12)  # meets the decay phase where it starts: no jump
    # Continuity: the warmup curve approaching W from below meets the decay curve at W.
    assert lr_of(W - 1e-9, cfg) == pytest.approx(lr_of(W, cfg), rel=1e-8)


@pytest.mark.parametrize("decay", ["cosine", "linear", "poly"])
def test_decay_ends_at_min_lr_and_never_goes_below(decay):
    cfg = cfg_of("linear", decay)
    assert lr_of(T, cfg) == pytest.approx(MIN_LR, abs=1e-15)
    assert min(lr_of(s, cfg) for s in range(T + 10)) >= MIN_LR - 1e-15


def test_linear_scaling_rule():
    cfg = load_config(None, ["schedule.scale_lr=true", "schedule.reference_batch_size=256", "optim.lr=0.1",
                             "train.global_batch_size=512", "data.num_samples=1024"])
    assert base_lr(cfg.optim.lr, cfg.train.global_batch_size, cfg.schedule) == pytest.approx(0.2)
    assert base_lr(0.1, 512, ScheduleConfig(scale_lr=False)) == 0.1


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=123.0)


def test_lambdalr_wrapper_equals_lr_at_and_resumes_mid_warmup():
    cfg = cfg_of("linear", "cosine")
    opt = _optimizer()
    sched = build_scheduler(opt, ETA, T, cfg)
    seen = []
    for _ in range(T):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_of(s, cfg) for s in range(T)], rel=1e-12)

    # Interrupt after 3 steps (mid-warmup), save, restore into fresh objects: the same sequence continues.
    opt, resumed = _optimizer(), []
    sched = build_scheduler(opt, ETA, T, cfg)
    for _ in range(3):
        opt.step()
        sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # the scheduler state is plain data
    opt2 = _optimizer()
    sched2 = build_scheduler(opt2, ETA, T, cfg)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    for _ in range(3, T):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(seen[3:], rel=1e-12)


@pytest.mark.parametrize("override, message", [
    ("schedule.warmup_start_factor=0", r"schedule\.warmup_start_factor: must be in \(0, 1\], got 0\.0"),
    ("schedule.warmup_start_factor=1.5", r"schedule\.warmup_start_factor: must be in \(0, 1\]"),
    ("schedule.warmup_steps=-1", r"schedule\.warmup_steps: must be >= 0"),
    ("schedule.power=0", r"schedule\.power: must be > 0"),
    ("schedule.gamma=0", r"schedule\.gamma: must be > 0"),
    ("schedule.milestones=[5, 3]", r"schedule\.milestones: must be increasing steps >= 1, got \[5, 3\]"),
    ("schedule.min_lr=1.0", r"schedule\.min_lr: must be in \[0, base lr=0\.1\], got 1\.0"),
    ("schedule.reference_batch_size=0", r"schedule\.reference_batch_size: must be >= 1"),
    ("schedule.decay=exp", r"schedule\.decay: 'exp' is not one of constant, cosine, linear, poly, step"),
])
def test_schedule_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps=30 exceeds train\.steps=20"):
        load_config(None, ["schedule.warmup=linear", "schedule.warmup_steps=30"])


def test_public_lr_at_takes_plain_arguments_and_defaults_to_linear_warmup_then_cosine():
    # base 1.0, 4 warmup steps from 0.1, cosine to 0 at step 12: values written out by hand.
    lrs = [disttrain.lr_at(s, base_lr=1.0, warmup_steps=4, total_steps=12) for s in (0, 2, 4, 8, 12, 20)]
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 0.5, 0.0, 0.0], abs=1e-15)


def test_warmup_schedule_follows_each_param_groups_lr_and_equals_lr_at():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.4}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2.0}])
    sched = disttrain.warmup_schedule(opt, warmup_steps=3, total_steps=10, decay="linear", min_lr=0.01)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for eta, column in zip((0.4, 2.0), zip(*seen)):
        expected_lrs = [disttrain.lr_at(s, base_lr=eta, warmup_steps=3, total_steps=10, decay="linear", min_lr=0.01)
                        for s in range(10)]
        assert list(column) == pytest.approx(expected_lrs, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup_steps=-1), r"^warmup_steps: must be >= 0, got -1$"),
    (dict(warmup_steps=20), r"^warmup_steps=20 exceeds total_steps=10$"),
    (dict(total_steps=0), r"^total_steps: must be >= 1, got 0$"),
    (dict(decay="exp"), r"^decay: must be one of constant, cosine, linear, poly, step, got 'exp'$"),
    (dict(min_lr=2.0), r"^min_lr: must be in \[0, base lr=1\], got 2\.0$"),
    (dict(warmup_start_factor=0.0), r"^warmup_start_factor: must be in \(0, 1\], got 0\.0$"),
])
def test_public_schedule_arguments_are_validated(kwargs, message):
    args = {"warmup_steps": 2, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        disttrain.lr_at(0, base_lr=1.0, **args)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        disttrain.warmup_schedule(opt, **args)

"""Clipping the global gradient, non-finite steps, and gradient accumulation, against one process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from disttrain.run.build import build
from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.run.step import train_step
from disttrain.run.train import Hook, Trainer
from disttrain.verify.whole import unclaimed_reason
from tests.common import max_rel_diff

BASE = ["train.global_batch_size=30", "train.steps=8", "train.device=cpu", "data.num_samples=90",
        "train.dtype=float64", "model.name=cnn", "optim.lr=0.2"]


def train_counting(cfg_dict: dict, hooks: tuple[Hook, ...] = ()) -> dict:
    """Train on this rank, counting all_reduce calls (gradient buckets and the metrics reduction).

    The metrics reduce the loss every 1, 2, 4, ... steps here (not by elapsed time), so the count is exact.
    """
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        cfg = config_from_dict(cfg_dict)
        with distributed("cpu") as env:
            result = Trainer(cfg, env, hooks, console=False, flush_seconds=math.inf).run()
    finally:
        dist.all_reduce = real
    return {"state": {k: v.clone() for k, v in result.model.state_dict().items()}, "losses": result.losses,
            "grad_norms": result.grad_norms, "skipped": result.skipped_steps, "all_reduces": len(calls)}


def single(overrides: list[str], tmp_path) -> dict:
    return train_counting(load_config(None, [*overrides, f"train.out_dir={tmp_path / 'ref'}"]).to_dict())


def distributed_run(pool, overrides: list[str], tmp_path) -> list[dict]:
    return pool.run(train_counting, load_config(None, [*overrides, f"train.out_dir={tmp_path / 'dist'}"]).to_dict())


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_norm_clipping_equals_single_device(pools, tmp_path, world_size):
    overrides = BASE + ["clip.mode=norm", "clip.max_norm=0.3"]
    ref = single(overrides, tmp_path)
    assert sum(n > 0.3 for n in ref["grad_norms"]) >= 4  # clipping is really active
    for out in distributed_run(pools(world_size), overrides, tmp_path):
        assert max_rel_diff(out["state"], ref["state"]) <= 1e-10
        torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]),
                                   rtol=1e-10, atol=0)
    unclipped = single(BASE, tmp_path)
    assert max_rel_diff(unclipped["state"], ref["state"]) > 1e-3  # and clipping changed the result


def test_clipping_before_averaging_differs(pools, tmp_path):
    """Each rank clipping its own gradient (the wrong order) no longer equals one device."""
    overrides = BASE + ["clip.mode=norm", "clip.max_norm=0.3", "comm.impl=allreduce"]
    ref = single(overrides, tmp_path)
    right = distributed_run(pools(2), overrides, tmp_path)[0]
    wrong = distributed_run(pools(2), overrides + ["clip.before_average=true"], tmp_path)[0]
    assert max_rel_diff(right["state"], ref["state"]) <= 1e-10
    assert max_rel_diff(wrong["state"], ref["state"]) > 1e-4


def test_value_clipping_equals_single_device(pools, tmp_path):
    overrides = BASE + ["clip.mode=value", "clip.value=0.02"]
    ref = single(overrides, tmp_path)
    out = distributed_run(pools(3), overrides, tmp_path)[0]
    assert max_rel_diff(out["state"], ref["state"]) <= 1e-10
    assert max_rel_diff(single(BASE, tmp_path)["state"], ref["state"]) > 1e-3  # value clipping was active


@pytest.mark.parametrize("world_size, impl", [(2, "ddp"), (4, "ddp"), (2, "allreduce")])
def test_accumulation_equals_one_device_and_communicates_once_per_step(pools, tmp_path, world_size, impl):
    # B=30: W=2 gives local batches of 15 (micro-batches 5,5,5); W=4 gives 8,8,7,7 (micro-batches 3,3,2 / 3,2,2).
    ref = single(BASE, tmp_path)  # one device, no accumulation, whole global batch
    plain = distributed_run(pools(world_size), BASE + [f"comm.impl={impl}"], tmp_path)
    accumulated = distributed_run(pools(world_size), BASE + [f"comm.impl={impl}", "train.accumulation_steps=3"],
                                  tmp_path)
    for out in accumulated:
        assert max_rel_diff(out["state"], ref["state"]) <= 1e-10
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=1e-12, atol=0)
    # One gradient all_reduce (one bucket) per optimizer step, with or without accumulation: the first k-1
    # micro-batches do not communicate. Plus the metrics' loss reductions: after steps 0, 2, 6 and at the end.
    steps, metric_flushes = 8, 4
    assert [o["all_reduces"] for o in accumulated] == [steps + metric_flushes] * world_size
    assert [o["all_reduces"] for o in plain] == [steps + metric_flushes] * world_size


def nonfinite_steps(cfg_dict: dict, bad_rank: int, bad_step: int) -> list[dict]:
    """Four steps by hand; at ``bad_step`` rank ``bad_rank`` feeds a NaN sample. Report what each step did."""
    cfg = config_from_dict(cfg_dict)
    records = []
    with distributed("cpu") as env:
        parts = build(cfg, env)
        batches, sync, optimizer, model = parts.batches, parts.sync, parts.optimizer, parts.sync.model
        for step in range(4):
            micro = batches.micro_batches(step, env.device, 1)
            if step == bad_step and env.rank == bad_rank:
                x, y = micro[0]
                x = x.clone()
                x[0] = float("nan")
                micro = [(x, y)]
            params = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(optimizer.state_dict()["state"])
            out = train_step(sync, optimizer, micro, cfg.clip, step)
            after = optimizer.state_dict()["state"]
            records.append({
                "stepped": out.stepped, "finite": math.isfinite(out.grad_norm),
                "params_unchanged": all(torch.equal(a, p) for a, p in zip(params, model.parameters())),
                "state_unchanged": state.keys() == after.keys() and all(
                    torch.equal(state[i]["momentum_buffer"], after[i]["momentum_buffer"]) for i in state),
            })
    return records


def test_nonfinite_gradient_skips_the_step_on_every_rank(pools, tmp_path):
    cfg = load_config(None, BASE + ["clip.mode=norm", f"train.out_dir={tmp_path}"])
    for records in pools(3).run(nonfinite_steps, cfg.to_dict(), 2, 2):
        assert [r["stepped"] for r in records] == [True, True, False, True]  # only step 2 skipped, run goes on
        assert [r["finite"] for r in records] == [True, True, False, True]
        assert records[2]["params_unchanged"] and records[2]["state_unchanged"]
        assert not records[3]["params_unchanged"] and not records[3]["state_unchanged"]


def test_nonfinite_gradient_error_mode_stops_every_rank(pools, tmp_path):
    cfg = load_config(None, BASE + ["clip.nonfinite=error", f"train.out_dir={tmp_path}"])
    from tests.harness import WorkerError

    with pytest.raises(WorkerError, match=r"(?s)ranks \[0, 1\] raised.*NonFiniteGradient: step 1: the global "
                                          r"gradient norm is nan \(clip\.nonfinite=error\)"):
        pools(2).run(nonfinite_steps, cfg.to_dict(), 0, 1)


def test_skipped_steps_are_counted_and_match_one_device(pools, tmp_path):
    """A NaN sample in the dataset: every rank skips the same steps as one device does, and counts them."""
    overrides = BASE + ["clip.mode=norm", "train.steps=6"]  # 6 steps of 30 over 90 samples: two epochs
    ref = single_with_nan(overrides, tmp_path)
    assert ref["skipped"] == 2  # the NaN sample is in one global batch per epoch
    for out in pools(2).run(train_with_nan_sample, load_config(None, [*overrides, f"train.out_dir={tmp_path}"]
                                                               ).to_dict()):
        assert out["skipped"] == 2
        assert max_rel_diff(out["state"], ref["state"]) <= 1e-10


class PoisonSample(Hook):
    """Sample 17 of the dataset becomes NaN once the run's parts are built."""

    def on_start(self, trainer) -> None:
        trainer.parts.batches.dataset.x[17] = float("nan")


def train_with_nan_sample(cfg_dict: dict) -> dict:
    return train_counting(cfg_dict, (PoisonSample(),))


def single_with_nan(overrides: list[str], tmp_path) -> dict:
    return train_with_nan_sample(load_config(None, [*overrides, f"train.out_dir={tmp_path / 'ref'}"]).to_dict())


def test_batchnorm_with_accumulation_is_not_claimed():
    assert unclaimed_reason(load_config(None, ["model.norm=bn", "train.accumulation_steps=2"])).startswith(
        "model.norm=bn with train.accumulation_steps=2: batch-norm statistics are computed per micro-batch")
    assert unclaimed_reason(load_config(None, ["model.norm=bn"])) == ""
    assert unclaimed_reason(load_config(None, ["train.accumulation_steps=2"])) == ""


def test_accumulation_config_errors():
    from disttrain.config import ConfigError, check_world_size

    with pytest.raises(ConfigError, match=r"train\.accumulation_steps: must be >= 1, got 0"):
        load_config(None, ["train.accumulation_steps=0"])
    cfg = load_config(None, ["train.global_batch_size=30", "train.accumulation_steps=8"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=30 over world size 4 gives local batches of "
                                          r"7 to 8 samples, which cannot be split into "
                                          r"train\.accumulation_steps=8 micro-batches"):
        check_world_size(cfg, 4)
    check_world_size(cfg, 3)  # 10 samples per rank: fine
    with pytest.raises(ConfigError, match=r"clip\.before_average: true needs comm\.impl=allreduce"):
        load_config(None, ["clip.before_average=true"])

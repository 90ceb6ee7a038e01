"""At most one host sync per training step (docs/performance-gpu.md): every read of a tensor on the host is counted
in the step loop, after the first step, for each strategy, fp16, clipping and per-sample dropout."""

from __future__ import annotations

import json

import torch

from disttrain.bench import main as bench_main
from disttrain.bench.syncs import HostSyncCounter
from disttrain.config.parse import load_config
from disttrain.parallel.env import DistEnv
from disttrain.run.train import Hook, Trainer


def test_the_step_loop_reads_the_device_at_most_once_per_step(pools, capsys):
    code = bench_main(["syncs", "--world-size", "2", "--steps", "2", "--json"],
                      run_world=lambda w, fn, *args: pools(w).run(fn, *args))
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    per_setting = {r["setting"]: r["reads_per_step"] for r in result["rows"]}
    assert set(per_setting) == {"ddp", "allreduce", "fsdp", "fp16", "clip norm", "dropout, augmentation"}
    assert all(counts == [1, 1] for counts in per_setting.values()), per_setting
    assert result["max_reads_per_step"] == 1


class _ReadsTwice(Hook):
    def on_step_end(self, trainer, step, result):
        float(result.loss_sum)
        bool(result.loss_sum > 0)


def test_the_counter_sees_every_kind_of_read(tmp_path):
    """A hook that reads two tensors per step adds two to the step's one; metrics flushes are not counted."""
    cfg = load_config(None, ["model.hidden=8", "train.global_batch_size=8", "train.steps=3", "train.device=cpu",
                             "train.checkpoint_every=0", "train.tensorboard=false", f"train.out_dir={tmp_path}"])
    counter = HostSyncCounter(first=1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    Trainer(cfg, env, hooks=[counter, _ReadsTwice()], console=False, flush_seconds=0.0).run()
    assert counter.reads == [3, 3]
    assert [getattr(torch.Tensor, name).__name__ for name in ("item", "tolist", "__bool__")] == [
        "item", "tolist", "__bool__"]  # restored after the run

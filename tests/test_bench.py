"""The benchmark suite (tiny sizes: each runs and its JSON has the fields), one thread per launched worker,
and the batched reduction of the logged loss (exact per-step records, few collectives)."""

from __future__ import annotations

import io
import json
import math
import os
import statistics

import pytest
import torch
import torch.distributed as dist

from disttrain.bench import BENCHMARKS
from disttrain.bench import main as bench_main
from disttrain.bench.step import EVERY_STEP
from disttrain.config import load_config
from disttrain.parallel.env import DistEnv, distributed
from disttrain.observe.metrics import MetricsLogger, StepMetrics
from disttrain.observe.runlog import read_metrics
from disttrain.run.train import run

TINY = ["--set", "train.device=cpu", "--set", "model.hidden=4", "--set", "train.global_batch_size=8", "--set", "data.num_samples=16"]


def _bench_json(pools, capsys, *argv: str) -> dict:
    code = bench_main([*argv, "--json"], run_world=lambda w, fn, *args: pools(w).run(fn, *args))
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["benchmark"] == argv[0]
    assert {"torch", "cpu_count", "backend", "threads_per_rank"} <= result["machine"].keys()
    return result


def test_every_benchmark_runs_tiny_and_reports_its_fields(pools, capsys):
    step = _bench_json(pools, capsys, "step", "--world-sizes", "1,2", "--steps", "2", "--warmup", "1",
                       "--rounds", "2", *TINY)
    assert [r["world_size"] for r in step["rows"]] == [1, 2]
    for row in step["rows"]:
        assert row["ms"].keys() == {"disttrain", EVERY_STEP, "hand-written DDP"} and min(row["ms"].values()) > 0
        assert len(row["round_ratios"]) == 2 and row["ratio"] == pytest.approx(statistics.median(row["round_ratios"]))
        assert row["every_step_ratio"] > 0 and row["page_faults_per_step"].keys() == row["ms"].keys()
    assert step["setting"]["config"][-1] == "data.num_samples=16"

    scaling = _bench_json(pools, capsys, "scaling", "--world-sizes", "2", "--steps", "2", "--warmup", "0",
                          "--rounds", "1", *TINY)
    base, two = scaling["rows"]  # W=1 is always the base
    assert (base["world_size"], two["world_size"], base["efficiency"], base["speedup"]) == (1, 2, 1.0, 1.0)
    assert two["efficiency"] == pytest.approx(base["ms"] / (2 * two["ms"]))
    assert two["speedup"] == pytest.approx(base["ms"] / two["ms"]) and two["global_batch_size"] == 8
    assert two["samples_per_s"] == pytest.approx(8e3 / two["ms"])

    allreduce = _bench_json(pools, capsys, "allreduce", "--world-sizes", "2", "--sizes", "1KiB,4KiB", "--iters", "2")
    assert [(r["world_size"], r["bytes"]) for r in allreduce["rows"]] == [(2, 1024), (2, 4096)]
    for row in allreduce["rows"]:
        assert row["algbw_gbps"] == pytest.approx(row["bytes"] / row["us"] / 1e3)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 2 * (2 - 1) / 2)
        assert row["memcpy_gbps"] > 0 and row["busbw_vs_memcpy"] == pytest.approx(
            row["busbw_gbps"] / row["memcpy_gbps"])

    syncbn = _bench_json(pools, capsys, "syncbn", "--world-sizes", "2", "--channels", "4", "--iters", "2")
    (row,) = syncbn["rows"]
    assert {"disttrain", "two-pass", "all_gather+Chan", "local"} <= row["ms"].keys()
    assert row["vs_two_pass"] == pytest.approx(row["ms"]["disttrain"] / row["ms"]["two-pass"])

    randomness = _bench_json(pools, capsys, "randomness", "--batch", "4", "--hidden", "2", "--steps", "2")
    assert [r["variant"] for r in randomness["rows"]] == ["none", "dropout", "dropout+flip_crop", "torch dropout"]
    assert all(r["min_ms"] > 0 for r in randomness["rows"]) and randomness["rows"][0]["min_vs_none"] == 1.0
    assert randomness["dropout_mask_ms"].keys() == {"per-sample", "torch"} and randomness["flip_crop_ms"] > 0

    memory = _bench_json(pools, capsys, "memory", "--models", "cnn", "--world-sizes", "2", "--batch", "8",
                         "--steps", "1")
    rows = {(r["impl"], r["recompute"]): r for r in memory["rows"]}
    assert rows.keys() == {(i, c) for i in ("ddp", "fsdp") for c in (False, True)}
    for row in rows.values():
        assert {"impl", "world_size", "recompute", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
                "step_ms", "comm_bytes", "peak_rss"} <= row.keys() and row["comm_bytes"] > 0
    assert rows["fsdp", False]["param_bytes"] < 0.6 * rows["ddp", False]["param_bytes"]
    assert rows["ddp", True]["activation_bytes"] * 2 <= rows["ddp", False]["activation_bytes"]
    (ratio,) = memory["ratios"]
    assert ratio["fsdp_over_ddp_state"] < 0.6 and ratio["activation_cut"] >= 2

    assert bench_main(["allreduce", "--world-sizes", "2", "--sizes", "1KiB", "--iters", "2"],
                      run_world=lambda w, fn, *args: pools(w).run(fn, *args)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| W | size | time us | algbw GB/s | busbw GB/s") and len(table) == 3


def test_bench_step_takes_an_mse_data_factory(pools, capsys):
    """The benchmark builds its data and model with the trainer's builder: float targets and train.loss=mse
    reach both loops (the hand-written one uses F.mse_loss)."""
    mse = ["--set", "train.device=cpu", "--set", "data.name=tests.factories:regression", "--set", "model.name=tests.factories:regressor",
           "--set", "train.loss=mse", "--set", "data.num_samples=16", "--set", "train.global_batch_size=8"]
    step = _bench_json(pools, capsys, "step", "--world-sizes", "1", "--steps", "2", "--warmup", "0", "--rounds", "1",
                       *mse)
    assert min(step["rows"][0]["ms"].values()) > 0


def test_bench_lists_names_and_rejects_usage_errors(capsys):
    assert bench_main([]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in BENCHMARKS) and "--help" in listing
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as done:
            bench_main([name, "--help"])
        assert done.value.code == 0 and "--json" in capsys.readouterr().out

    assert bench_main(["nope"]) == 2
    assert capsys.readouterr().err == ("disttrain: error: unknown benchmark 'nope' (choose from step, scaling, "
                                       "allreduce, syncbn, randomness, data, memory, launch, checkpoint, syncs)\n")
    assert bench_main(["memory", "--models", "cnn,vgg"]) == 2
    assert capsys.readouterr().err == "disttrain: error: --models: unknown vgg (choose from cnn, resnet)\n"
    with pytest.raises(SystemExit) as done:
        bench_main(["allreduce", "--sizes", "6B"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("disttrain: error: disttrain bench allreduce: argument --sizes: ")
    assert "multiples of 4 bytes" in err and err.count("\n") == 1
    # A bad config is found before any process starts.
    assert bench_main(["step", "--set", "model.hidden=zero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disttrain: error: model.hidden") and err.count("\n") == 1
    assert bench_main(["scaling", "--world-sizes", "4", "--set", "train.global_batch_size=2"]) == 2
    assert "train.global_batch_size=2" in capsys.readouterr().err


# ---------------------------------------------------------------------- one thread per launched worker

def test_one_thread_per_worker_unless_the_user_says_otherwise(monkeypatch):
    from disttrain.parallel.launch import one_thread_per_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with one_thread_per_worker(2):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ  # only for the launch
    with one_thread_per_worker(1):  # a single worker keeps torch's default, as under torchrun
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with one_thread_per_worker(4):
        assert os.environ["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    assert os.environ["OMP_NUM_THREADS"] == "3"


def report_threads(env) -> tuple[str | None, int, int]:
    """A task: what the launched process was given, and the session it runs in."""
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(), os.getsid(0)


def test_launched_workers_get_one_intra_op_thread_and_a_session_each(monkeypatch):
    """As torchrun starts them: one intra-op thread, and each worker in a session of its own (not the launcher's).
    torch's agent installs handlers for the signals it forwards and keeps them; a process that launches and goes on
    (this test session) gets its own back, so SIGTERM still ends it."""
    import signal

    from disttrain.parallel.launch import launch_local_tasks

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    mine = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine)
    try:
        (omp0, threads0, sid0), (omp1, threads1, sid1) = (r[0] for r in launch_local_tasks([(report_threads, ())],
                                                                                             2, "cpu"))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
    assert (omp0, threads0, omp1, threads1) == ("1", 1, "1", 1)
    assert len({sid0, sid1, os.getsid(0)}) == 3


# ---------------------------------------------------------------------- batched reduction of the logged loss

def train_and_count(cfg_dict: dict) -> dict:
    """Train on this rank with loss reductions every 1, 2, 4, ... steps; the size of every all_reduce."""
    from disttrain.config import config_from_dict

    sizes = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append((tensor.dtype, tensor.numel()))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    flush_seconds, StepMetrics.flush_seconds = StepMetrics.flush_seconds, math.inf
    try:
        with distributed("cpu") as env:
            losses = run(config_from_dict(cfg_dict), env, console=False).losses
    finally:
        dist.all_reduce = real
        StepMetrics.flush_seconds = flush_seconds
    return {"losses": losses, "sizes": sizes}


def test_batched_loss_reduction_keeps_every_step_exact(pools, tmp_path):
    common = ["train.dtype=float64", "train.steps=10", "train.log_every=3", "train.global_batch_size=15",
              "data.num_samples=60", "model.hidden=8", "train.device=cpu"]
    ref = train_and_count(load_config(None, [*common, f"train.out_dir={tmp_path / 'one'}"]).to_dict())
    ranks = pools(2).run(train_and_count, load_config(None, [*common, f"train.out_dir={tmp_path / 'two'}"]).to_dict())
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(10)) and all(r["samples"] == 15 for r in two)  # slices 8 + 7
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-12, atol=0)
    assert ranks[0]["losses"] == ranks[1]["losses"] == [r["loss"] for r in two]  # every rank, every step
    assert ref["losses"] == [r["loss"] for r in one]
    # Loss reductions (float64, [sums, counts, interval]) after steps 0, 2, 6 and at the end: 4 collectives
    # for 10 steps, next to one gradient all_reduce per step (one bucket, in the model's float64 too).
    metric_sizes = [n for _, n in ranks[0]["sizes"] if n in (3, 5, 9, 7)]
    assert metric_sizes == [2 * 1 + 1, 2 * 2 + 1, 2 * 4 + 1, 2 * 3 + 1]
    assert len(ranks[0]["sizes"]) == 10 + 4 and ranks[0]["sizes"] == ranks[1]["sizes"]


def test_flush_at_any_step_puts_every_step_on_disk(tmp_path):
    """The loop may flush at any step (say, before a checkpoint): metrics.jsonl then holds every step so far."""
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    console = io.StringIO()
    metrics = StepMetrics(MetricsLogger(tmp_path, env, log_every=2, total_steps=6, stream=console), env)
    metrics.flush_seconds = math.inf  # intervals 1, 2, 4, ...
    for step in range(6):
        metrics.record(step, torch.tensor(3.0 * (step + 1), dtype=torch.float64), 3, lr=0.1)
        if step == 3:
            metrics.flush()
            assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]  # steps 4, 5 still pending
    metrics.flush()
    records = read_metrics(tmp_path)
    assert [r["loss"] for r in records] == metrics.losses == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert records[0] == {"step": 0, "loss": 1.0, "samples": 3, "lr": 0.1}
    assert [line.split()[1] for line in console.getvalue().splitlines()] == ["1/6", "3/6", "5/6", "6/6"]
    metrics.flush()  # nothing pending: no collective, nothing written
    assert metrics.flushes == 4 and len(read_metrics(tmp_path)) == 6

    every_step = StepMetrics(MetricsLogger(tmp_path / "b", env, 1, 3, console=False), env)
    every_step.flush_seconds = 0.0  # a reduction every step, as a blocking per-step all_reduce would
    for step in range(3):
        every_step.record(step, torch.tensor(1.0, dtype=torch.float64), 1)
        assert len(read_metrics(tmp_path / "b")) == step + 1


def grad_sync_kind(cfg_dict: dict) -> str:
    from disttrain.parallel.strategies import build_grad_sync
    from disttrain.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    with distributed("cpu") as env:
        return type(build_grad_sync(torch.nn.Linear(2, 2), cfg.comm, env, 8, 8)).__name__


def test_a_process_group_of_one_reduces_nothing(pools):
    """Under torchrun with one process there is a group of one: no DDP (nothing to reduce), as without a group."""
    for impl in ("ddp", "allreduce"):
        assert pools(1).run(grad_sync_kind, load_config(None, [f"comm.impl={impl}"]).to_dict()) == ["LocalSync"]
    assert pools(2).run(grad_sync_kind, load_config(None, []).to_dict()) == ["DDPSync", "DDPSync"]


def test_bench_data_runs_tiny_and_reports_its_fields(pools, capsys):
    """Loader throughput per worker count, step time from disk vs memory (identical samples, so identical
    losses), and fresh processes on two arrays sizes: every number there and positive (none is asserted on)."""
    data = _bench_json(pools, capsys, "data", "--steps", "2", "--rounds", "1", "--sizes", "200,400", "--batch", "8")
    loader, steps, sizes = data["rows"]["loader"], data["rows"]["step"], data["rows"]["sizes"]
    assert [r["workers"] for r in loader] == [0, 1, 2] and loader[0]["speedup_vs_0"] == 1.0
    assert all(min(r["samples_per_s"], r["ms_per_batch"], r["first_batch_ms"], r["speedup_vs_0"]) > 0 for r in loader)
    assert [r["data"] for r in steps] == ["arrays (decoded, float32)", "imagefolder, 0 workers",
                                          "imagefolder, 2 workers"]
    assert all(r["ms_per_step"] > 0 and r["vs_arrays"] > 0 for r in steps) and steps[0]["vs_arrays"] == 1.0
    assert data["same_losses"] is True
    assert [(r["samples"], r["x_bytes"] // (3 * 32 * 32)) for r in sizes] == [(200, 200), (400, 400)]
    assert all(r["first_step_s"] > r["import_s"] > 0 and r["peak_rss_kib"] > 0 for r in sizes)
    ratios = data["size_ratios"]
    assert (ratios["small"], ratios["big"]) == (200, 400) and ratios["rss_ratio"] > 0 and ratios["time_ratio"] > 0
    assert {"rss_met", "time_met", "time_limit_s"} <= ratios.keys()


def test_one_process_runs_take_a_workers_threads_unless_the_user_chose(monkeypatch):
    """verify's reference and twins, step-wise retraining and the demos' one-process runs stand in for W ranks: they
    run with the threads one of those ranks would have (cores / W, at least 1), restored after; a thread count the
    user chose (a variable, or torch.set_num_threads) is left alone."""
    from disttrain.parallel import env

    for name in env.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(env, "machine_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # torch's default on 4 cores: one per core
        with env.threads_of_a_worker(2) as threads:
            assert threads == torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        with env.threads_of_a_worker(8) as threads:
            assert threads == torch.get_num_threads() == 1
        torch.set_num_threads(3)  # the user's own choice
        with env.threads_of_a_worker(2) as threads:
            assert threads == torch.get_num_threads() == 3
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        with env.threads_of_a_worker(2) as threads:
            assert threads == torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


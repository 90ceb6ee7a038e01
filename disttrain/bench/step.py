"""The trainer's step against a hand-written DDP loop on the same model, data and batch, side by side.

    disttrain bench step [--world-sizes 1,2] [--steps 20] [--warmup 5] [--rounds 10] [--set KEY=VALUE ...] [--json]

On every rank of a W-process gloo group (one intra-op thread per rank), alternating in rounds:
- ``disttrain``: ``disttrain.train.run``, the trainer's own loop: this rank's slice of the global batch, the
  step function (loss sum over the global batch size, DDP with the count-weighted-mean hook when W > 1,
  the global gradient norm, optimizer step), the schedule, and the per-step metrics (reduced over ranks in
  batches of steps, written to metrics.jsonl on rank 0);
- ``disttrain, loss reduced every step``: the same loop with the logged loss reduced over ranks by a
  blocking all_reduce every step, as a simple trainer does: the cost of that one small collective;
- ``hand-written DDP``: the loop of torch's DDP tutorial on the same model and initial weights, optimizer
  and batches: DistributedDataParallel, F.cross_entropy (mean), zero_grad, backward, optimizer.step;
- with ``--set train.compile=true`` also ``disttrain, eager``: the trainer without compiling, for the
  compiled/eager ratio; the compile time is the compiled run's first step less an eager first step.

Time per step is the time from the start of one step to the start of the next, so it holds everything
the loop does; the median over steps and rounds on the slowest rank. The ratios are the median over rounds
of each round's ratio, the loops having run back to back in it. Minor page faults per step are reported
too (the median, on the rank with most): on CPU, re-faulting the activation memory that the C allocator
returned to the system can cost more than communication. The default setting is a CNN with
hidden 64 in float32, global batch 256 (``--set`` changes it, as for ``disttrain train``). The hand-written
loop does no clipping, schedule or accumulation: with those set, the trainer does more work than it. With
``train.precision`` bf16 or fp16 both loops autocast forward and loss, and the hand-written one scales an fp16 loss
with torch.amp.GradScaler, as its tutorial does (its inf check is per rank: the trainer's is on the reduced
gradient, precision.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..run.build import build_data_and_model
from ..optim.optimizer import build_optimizer
from ..config.validate import check_world_size
from ..config.parse import config_from_dict, load_config
from ..data.loader import GlobalBatches
from ..parallel.env import distributed
from ..run.precision import autocast
from ..randomness import sample_keys
from ..run.train import Hook, Trainer
from .common import RunWorld, StepClock, interleaved, machine, markdown_table, non_negative_int, paired_ratios, positive_int, positive_ints, slowest_median_ms, spawn_world

EVERY_STEP = "disttrain, loss reduced every step"
HAND = "hand-written DDP"
EAGER = "disttrain, eager"  # with --set train.compile=true: the same loop without compiling, side by side
# No checkpoints: the hand-written loop writes none either (their cost is measured in the README's
# Fault tolerance section).
DEFAULTS = ["model.name=cnn", "model.hidden=64", "model.norm=none", "train.dtype=float32",
            "train.global_batch_size=256", "train.device=cpu", "train.checkpoint_every=0"]
# --model gpt: the built-in gpt on padded sequences of 1 to 64 tokens (bench/sequences.py), 32 per step.
GPT_DEFAULTS = [*DEFAULTS, "model.name=gpt", "model.kwargs={layers: 2, heads: 2}", "train.loss=token_cross_entropy",
                "data.name=disttrain.bench.sequences:padded_sequences", "data.num_classes=256",
                "data.kwargs={seq_len: 64}", "data.num_samples=4096", "train.global_batch_size=32"]
# Token losses: the trainer once more with the target count known locally (comm.reduce=sum divides by this rank's
# own count: the same computation and gradient all_reduce, without the count's all_reduce): that collective's cost.
LOCAL_COUNT = "disttrain, token count not all-reduced"


def bench_config(overrides: list[str], out_dir: str, defaults: list[str] = DEFAULTS) -> dict[str, Any]:
    """The benchmarked config as a dict: ``defaults`` < ``overrides`` (section.key=value); ConfigError if invalid."""
    return load_config(None, [*defaults, *overrides, f"train.out_dir={out_dir}"]).to_dict()


def trainer_steps(cfg_dict: dict[str, Any], steps: int, warmup: int, reduce_loss_every_step: bool = False) -> StepClock:
    """On every rank: ``disttrain.train.run`` for ``warmup + steps + 1`` steps, stamped at each step's start."""
    cfg = config_from_dict({**cfg_dict, "train": {**cfg_dict["train"], "steps": warmup + steps + 1}})
    clock = StepClock()
    with distributed(cfg.train.device, cfg.comm.timeout_s) as env:
        # flush_seconds=0: the logged loss is reduced by a collective every step.
        Trainer(cfg, env, hooks=[StampSteps(clock)], console=False,
                flush_seconds=0.0 if reduce_loss_every_step else 1.0).run()
    return clock


class StampSteps(Hook):
    """A stamp of ``clock`` at the start of every step of the trainer's loop."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.clock.stamp()


def hand_written_steps(cfg_dict: dict[str, Any], steps: int, warmup: int) -> StepClock:
    """On every rank: a torch-tutorial DDP loop on the trainer's model, data and batches, stamped per step."""
    cfg = config_from_dict(cfg_dict)
    clock = StepClock()
    with distributed(cfg.train.device, cfg.comm.timeout_s) as env:
        dataset, model = build_data_and_model(cfg, env.device)
        batches = GlobalBatches(dataset, cfg.train.global_batch_size, cfg.seed, env.rank, env.world_size)
        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        optimizer = build_optimizer(ddp.parameters(), cfg.optim)
        scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
        for step in range(warmup + steps + 1):
            clock.stamp()
            x, y, keys = batches.keyed_batch(step, env.device)
            with autocast(cfg.train.precision, env.device.type):
                with sample_keys(keys):  # a model with dropout draws its masks per sample (randomness.py)
                    output = ddp(x)
                if cfg.train.loss == "token_cross_entropy":  # the tutorial's per-rank mean over its tokens
                    loss = F.cross_entropy(output.flatten(0, 1), y.flatten(), ignore_index=-100)
                else:
                    loss = (F.mse_loss if cfg.train.loss == "mse" else F.cross_entropy)(output, y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return clock


def _rank_step(cfg_dict: dict[str, Any], steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    faults: dict[str, list[int]] = {}
    first: dict[str, list[float]] = {}  # seconds of each run's step 0 (compile happens there)

    def timed(name: str, run: Callable[[], StepClock]) -> Callable[[], list[float]]:
        def once() -> list[float]:
            clock = run()
            faults.setdefault(name, []).extend(clock.faults_per_step(warmup))
            first.setdefault(name, []).append(clock.periods(0)[0])
            return clock.periods(warmup)
        return once

    variants = {"disttrain": timed("disttrain", lambda: trainer_steps(cfg_dict, steps, warmup)),
                EVERY_STEP: timed(EVERY_STEP, lambda: trainer_steps(cfg_dict, steps, warmup, True)),
                HAND: timed(HAND, lambda: hand_written_steps(cfg_dict, steps, warmup))}
    if cfg_dict["train"]["loss"] == "token_cross_entropy":  # the same trainer with a count known in advance
        local = {**cfg_dict, "comm": {**cfg_dict["comm"], "reduce": "sum"}}
        variants[LOCAL_COUNT] = timed(LOCAL_COUNT, lambda: trainer_steps(local, steps, warmup))
    if cfg_dict["train"]["compile"]:
        eager = {**cfg_dict, "train": {**cfg_dict["train"], "compile": False}}
        variants[EAGER] = timed(EAGER, lambda: trainer_steps(eager, steps, warmup))
    times = interleaved(variants, rounds)
    return {"times": times, "faults": {name: statistics.median(f) for name, f in faults.items()}, "first": first}


def bench_step(overrides: list[str], world_sizes: tuple[int, ...] = (1, 2), steps: int = 20, warmup: int = 5,
               rounds: int = 10, run_world: RunWorld = spawn_world, defaults: list[str] = DEFAULTS
               ) -> list[dict[str, Any]]:
    """One row per world size: median ms per step of each loop, and the ratios to the hand-written loop.

    A ratio is the median over rounds of the round's ratio (the loops ran back to back in each round). Token losses
    add ``count_ratio`` (the trainer against itself without the count's all_reduce) and ``tokens_per_step``
    (targets per global batch, the mean over the timed steps).
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as out_dir:
        cfg_dict = bench_config(overrides, out_dir, defaults)
        for world_size in world_sizes:
            check_world_size(config_from_dict(cfg_dict), world_size)
        for world_size in world_sizes:
            results = run_world(world_size, _rank_step, cfg_dict, steps, warmup, rounds)
            per_rank = [r["times"] for r in results]
            ratios = paired_ratios(per_rank, "disttrain", HAND)
            every_step = paired_ratios(per_rank, EVERY_STEP, HAND)
            row = {"world_size": world_size, "ms": slowest_median_ms(per_rank),
                   "ratio": statistics.median(ratios), "every_step_ratio": statistics.median(every_step),
                   "round_ratios": ratios, **_token_columns(cfg_dict, per_rank, warmup, steps),
                   "page_faults_per_step": {k: max(r["faults"][k] for r in results) for k in per_rank[0]}}
            if EAGER in per_rank[0]:
                row.update(compile_result(per_rank, [r["first"] for r in results]))
            rows.append(row)
    return rows


def _token_columns(cfg_dict: dict[str, Any], per_rank: list[dict], warmup: int, steps: int) -> dict[str, Any]:
    if cfg_dict["train"]["loss"] != "token_cross_entropy":
        return {}
    cfg = config_from_dict(cfg_dict)
    batches = GlobalBatches(build_data_and_model(cfg, torch.device("cpu"))[0], cfg.train.global_batch_size, cfg.seed,
                            0, 1)
    tokens = [int((batches.batch(s, torch.device("cpu"))[1] != -100).sum()) for s in range(warmup, warmup + steps)]
    return {"count_ratio": statistics.median(paired_ratios(per_rank, "disttrain", LOCAL_COUNT)),
            "tokens_per_step": statistics.mean(tokens)}


def compile_result(per_rank: list[dict[str, list[list[float]]]], first: list[dict[str, list[float]]]
                   ) -> dict[str, Any]:
    """train.compile=true: the compiled/eager step ratio (paired per round) and the compile time: the compiled
    run's first step in the first round (later rounds reuse dynamo's compilations) less an eager first step."""
    ratios = paired_ratios(per_rank, "disttrain", EAGER)
    compile_s = max(f["disttrain"][0] - statistics.median(f[EAGER]) for f in first)
    return {"compiled_over_eager": statistics.median(ratios), "compiled_round_ratios": ratios,
            "compile_s": compile_s}


def add_run_arguments(parser: argparse.ArgumentParser, world_sizes: tuple[int, ...], world_help: str, rounds: int,
                      rounds_help: str) -> None:
    """The options of the benchmarks that time the trainer (step, scaling)."""
    parser.add_argument("--world-sizes", type=positive_ints, default=world_sizes, help=world_help)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=5,
                        help="untimed steps at the start of each run (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=rounds, help=rounds_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"change the benchmarked config (default: {' '.join(DEFAULTS)})")


def run_result(name: str, args: argparse.Namespace, rows: list[dict]) -> dict[str, Any]:
    setting = {"config": [*DEFAULTS, *args.overrides], "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds}
    return {"benchmark": name, "machine": machine(), "setting": setting, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, (1, 2), "comma-separated process counts (default 1,2)", 10,
                      "runs of each loop, alternating: short runs, many rounds (default 10)")
    parser.add_argument("--model", choices=("cnn", "gpt"), default="cnn",
                        help="cnn (the defaults above) or gpt: the built-in gpt with train.loss=token_cross_entropy "
                             f"({' '.join(GPT_DEFAULTS[len(DEFAULTS):])})")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    defaults = GPT_DEFAULTS if getattr(args, "model", "cnn") == "gpt" else DEFAULTS
    result = run_result("step", args, bench_step(args.overrides, args.world_sizes, args.steps, args.warmup,
                                                 args.rounds, run_world, defaults))
    result["setting"]["config"] = [*defaults, *args.overrides]
    return result


def format_table(result: dict[str, Any]) -> str:
    table = _table(result)
    compiled = [r for r in result["rows"] if "compiled_over_eager" in r]
    if compiled:
        table += "\n\n" + markdown_table(["W", "eager ms/step", "compiled ms/step", "compiled / eager",
                                           "compile time s (first step)"], [
            [str(r["world_size"]), f"{r['ms'][EAGER]:.2f}", f"{r['ms']['disttrain']:.2f}",
             f"{r['compiled_over_eager']:.3f}", f"{r['compile_s']:.1f}"] for r in compiled])
    return table


def _table(result: dict[str, Any]) -> str:
    return markdown_table(["W", "hand-written DDP ms/step", "disttrain ms/step", "disttrain / hand-written",
                           "loss reduced every step ms/step", "every step / hand-written",
                           "page faults/step (disttrain, hand-written)"], [
        [str(r["world_size"]), f"{r['ms'][HAND]:.2f}", f"{r['ms']['disttrain']:.2f}", f"{r['ratio']:.3f}",
         f"{r['ms'][EVERY_STEP]:.2f}", f"{r['every_step_ratio']:.3f}",
         f"{r['page_faults_per_step']['disttrain']:.0f}, {r['page_faults_per_step'][HAND]:.0f}"]
        for r in result["rows"]]) + "\n\n" + FAULTS_NOTE + _token_table(result["rows"])


FAULTS_NOTE = ("page faults/step: minor page faults per step, the median on the rank with most: pages of memory that "
               "the C allocator gave back to the system and the next step touches again, each zero-filled on first "
               "touch (on the default CNN, 700-1,500 per step cost about 3 ms of a 7-8 ms step; "
               "MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ remove them: docs/performance.md).")


def _token_table(rows: list[dict[str, Any]]) -> str:
    if "count_ratio" not in rows[0]:
        return ""
    return "\n\n" + markdown_table(
        ["W", "tokens/step", "disttrain tokens/s", "hand-written tokens/s", "disttrain / hand-written (time)",
         "count not all-reduced ms/step", "disttrain / count not all-reduced (time)"], [
            [str(r["world_size"]), f"{r['tokens_per_step']:.0f}",
             f"{1000 * r['tokens_per_step'] / r['ms']['disttrain']:.0f}",
             f"{1000 * r['tokens_per_step'] / r['ms'][HAND]:.0f}", f"{r['ratio']:.3f}",
             f"{r['ms'][LOCAL_COUNT]:.2f}", f"{r['count_ratio']:.3f}"] for r in rows])

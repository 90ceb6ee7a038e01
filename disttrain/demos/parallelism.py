"""Data parallel, sharded, or model parallel?

The same MLP (float64, SGD with momentum) is trained on the same global batches three ways by W processes, and
by one process on the whole global batch:

- data parallel (``comm.impl: ddp``): every rank holds the whole model and a slice of the batch; the gradients
  are all-reduced once per step (count-weighted);
- sharded data parallel (``comm.impl: fsdp``): as ddp, but each rank holds 1/W of the parameters, gradients and
  optimizer state; parameters are all-gathered before use and gradients reduce-scattered;
- model parallel as AlexNet did it (disttrain/demos/tensorparallel.py): every rank runs the whole batch, the middle
  layer's output features are split over the ranks, and its activations are all-gathered.

Besides the deviation from one device, each way's per-rank state bytes and the bytes its collectives move per
step (bench memory's counting) are measured at several global batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


from ..bench.memory import counted_collectives, measure, state_bytes
from ..run.build import build_data_and_model
from ..optim.optimizer import build_optimizer
from ..checkpoint.format import load_final
from ..config.parse import config_from_dict
from ..data.loader import GlobalBatches
from ..parallel.env import DistEnv
from ..run.step import summed_loss
from .tensorparallel import SplitMLP
from ..verify.whole import relative_difference
from .common import EQUAL, Check, Lab, Result, at_most, config, deviation, losses, sci
from .figures import axes, deviation_bars, new_figure, save

NAME = "parallelism"
QUESTION = "Multi-process training: data parallel, sharded, or model parallel?"
CLAIM = ("data parallel, sharded data parallel and model parallel all equal one device; sharding cuts each rank's "
         "state to about 1/W; model parallelism moves bytes that grow with the batch, data parallelism bytes that "
         "do not")
# One name per way, in the table, the checks, the plots and result.json alike.
SPLIT = "model_parallel"
WAYS = {"ddp": "data parallel (ddp)", "fsdp": "sharded (fsdp)", SPLIT: "model parallel (split layer)"}
COLORS = {"ddp": "#1f77b4", "fsdp": "#2ca02c", SPLIT: "#ff7f0e"}
SHARD_SLACK = 0.05  # fsdp state <= (1/W + 5 %) of ddp's: shards are padded to equal sizes


def tensor_parallel(env: DistEnv, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train the MLP split over this group's ranks (every rank runs the whole global batch); per-step losses,
    the whole final parameters (on rank 0), this rank's state bytes and the bytes of its collectives per step."""
    cfg = config_from_dict(cfg_dict)
    data, mlp = build_data_and_model(cfg, env.device)
    model = SplitMLP(mlp)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    batches = GlobalBatches(data, cfg.train.global_batch_size, cfg.seed, rank=0, world_size=1)  # whole batches
    step_losses, comm = [], []
    for step in range(cfg.train.steps):
        x, y, _ = batches.keyed_micro_batches(step, env.device, 1)[0]
        counts: list[int] = []
        optimizer.zero_grad(set_to_none=True)
        with counted_collectives(counts):
            loss = summed_loss(cfg.train.loss, model(x), y)
            (loss / cfg.train.global_batch_size).backward()
        optimizer.step()
        step_losses.append(loss.item() / cfg.train.global_batch_size)
        comm.append(sum(counts))
    state = model.full_state()
    return {"losses": step_losses, "state": state if env.is_main else None, "comm_bytes": max(comm),
            **state_bytes(model, optimizer)}


def _measure(env: DistEnv, overrides: list[str]) -> dict[str, Any]:
    return measure(overrides, steps=1)


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w = lab.settings.nproc
    steps = 6 if lab.settings.quick else 30
    hidden = w * -(-64 // w)  # a multiple of W near 64, so the split layer divides evenly
    batch = 8 * w - 1  # uneven slices for the data-parallel ways
    sweep = (8, 128) if lab.settings.quick else (8, 32, 128, 512)
    base = ["model.name=mlp", "model.norm=none", f"model.hidden={hidden}", "train.dtype=float64",
            "optim.name=sgd", "optim.lr=0.05", f"data.num_samples={max(sweep) * 2}"]
    run = [*base, f"train.steps={steps}", f"train.global_batch_size={batch}"]
    runs = out / "runs"
    dirs = {impl: lab.train(runs / impl, config(*run, f"comm.impl={impl}"), w) for impl in ("ddp", "fsdp")}
    one = lab.train(runs / "one_device", config(*run), 1)
    tp = lab.call(w, tensor_parallel, config(*run).to_dict())
    costs: dict[str, list[Any]] = {SPLIT: [lab.call(w, tensor_parallel, config(
        *base, "train.steps=1", f"train.global_batch_size={b}").to_dict()) for b in sweep]}
    for impl in ("ddp", "fsdp"):
        costs[impl] = [lab.call(w, _measure, [*base, f"comm.impl={impl}", f"train.global_batch_size={b}"])
                       for b in sweep]

    def finish() -> Result:
        ref = load_final(one / "final.pt")["model"]
        tp_rank0 = tp.value  # rank 0's answer
        dev = {impl: deviation(d, one) for impl, d in dirs.items()}
        dev[SPLIT] = max(max(relative_difference(tp_rank0["state"][k], ref[k]) for k in ref),
                        max(abs(a - b) / abs(b) for a, b in zip(tp_rank0["losses"], losses(one))))
        # Rank 0's numbers (it holds the largest shard: fsdp pads shards to equal sizes).
        per_rank = {impl: [p.value["comm_bytes"] for p in costs[impl]] for impl in costs}  # at each batch
        held = {impl: (lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"])(costs[impl][0].value)
                for impl in costs}
        tp_growth = per_rank[SPLIT][-1] / per_rank[SPLIT][0]
        ddp_growth = per_rank["ddp"][-1] / per_rank["ddp"][0]
        batch_growth = sweep[-1] / sweep[0]
        shard_ratio = held["fsdp"] / held["ddp"]
        checks = [Check(f"{WAYS[k]}: deviation from one device {sci(v)} <= {EQUAL:.0e}", at_most(v, EQUAL))
                  for k, v in dev.items()]
        checks += [
            Check(f"fsdp state per rank {held['fsdp']} B = {shard_ratio:.3f} of ddp's {held['ddp']} B "
                  f"<= 1/W + {SHARD_SLACK:.0%} = {1 / w + SHARD_SLACK:.3f}", shard_ratio <= 1 / w + SHARD_SLACK),
            Check(f"model parallel bytes per step grow {tp_growth:.1f}x for a {batch_growth:g}x larger batch "
                  f"(>= half of it)", tp_growth >= batch_growth / 2),
            Check(f"data parallel bytes per step grow {ddp_growth:.2f}x for it (< 1.01x: the gradients only)",
                  ddp_growth < 1.01),
        ]
        crossover = next((b for b, t, d in zip(sweep, per_rank[SPLIT], per_rank["ddp"]) if t > d), None)
        summary = (f"At W={w} all three equal one device (ddp {sci(dev['ddp'])}, fsdp {sci(dev['fsdp'])}, model "
                   f"parallel {sci(dev[SPLIT])}). Per rank, fsdp holds {shard_ratio:.2f} of ddp's parameter, "
                   f"gradient and optimizer bytes ({held['fsdp']} vs {held['ddp']}), the split model "
                   f"{held[SPLIT] / held['ddp']:.2f}. Per step, ddp moves {per_rank['ddp'][0]} B whatever the batch "
                   f"(the gradients), fsdp {per_rank['fsdp'][0]} B (parameters gathered twice, gradients "
                   f"reduce-scattered), model parallelism {per_rank[SPLIT][0]} B at batch {sweep[0]} and "
                   f"{per_rank[SPLIT][-1]} B at batch {sweep[-1]} (activations: it grows with the batch"
                   + (f", past ddp's from batch {crossover}" if crossover else "") + "). Model parallelism pays when "
                   "a layer does not fit one device, data parallelism when the model fits and the batch is large.")
        table = [["way", "deviation", "state bytes/rank",
                  *[f"comm B/step at batch {b}" for b in sweep]]]
        for k, label in WAYS.items():
            table.append([label, sci(dev[k]), str(held[k]), *[str(v) for v in per_rank[k]]])
        plots = [_plot(out, dev, held, per_rank, sweep, w)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"An MLP (hidden {hidden}, float64, SGD with momentum, {steps} steps, global batch {batch}) "
                        f"trained by W={w} processes with ddp, with fsdp, and with its middle layer split by output "
                        "features over the ranks (every rank running the whole batch, activations all-gathered); "
                        "and by one process. State bytes and bytes communicated per step are measured at global "
                        f"batches {', '.join(map(str, sweep))}."),
            numbers={"world_size": w, "deviation": dev, "state_bytes": held, "comm_bytes": per_rank,
                     "batches": list(sweep)})

    return finish


def _plot(out: Path, dev: dict, held: dict, comm: dict, sweep: tuple[int, ...], w: int) -> str:
    return save(figure(dev, held, comm, sweep, w), out, "parallelism.png")


def figure(dev: dict, held: dict, comm: dict, sweep: tuple[int, ...], w: int) -> Any:
    """Deviation, state bytes and bytes communicated of each way, each named as in the table (WAYS)."""
    fig, (dev_ax, held_ax, comm_ax) = new_figure(3, (15.0, 4.6))
    keys = list(WAYS)
    ticks = [WAYS[k].replace(" (", "\n(") for k in keys]  # the name, its short form under it
    deviation_bars(dev_ax, ticks, [dev[k] for k in keys], [COLORS[k] for k in keys],
                   f"deviation from one device (W={w})", "way of distributing the model")
    held_ax.bar(range(len(keys)), [held[k] / 1024 for k in keys], color=[COLORS[k] for k in keys], width=0.6)
    held_ax.set_xticks(range(len(keys)), ticks)
    held_ax.set_ylabel("KiB per rank")
    axes(held_ax, "parameters + gradients + optimizer state", xlabel=None, legend=False)
    for k in keys:
        comm_ax.plot(sweep, [v / 1024 for v in comm[k]], marker="o", color=COLORS[k], label=WAYS[k])
    comm_ax.set_xscale("log")
    axes(comm_ax, "bytes communicated per step and rank", xlabel="global batch", ylabel="KiB", log=True)
    return fig

"""Measure the calibrated verdicts of disttrain.verify over a table of configs (a script that prints numbers).

    python -m tests.measure_verdicts [--out runs/verdicts-measure] [--only NAME ...]
    python -m tests.measure_verdicts --table [--out runs/verdicts-measure]     # re-print from the saved results

Every case is trained by W processes, by one process reading each batch as the W ranks do (verify's reference), and
by the reference's two rounding twins (verify/twin.py), then judged as verify judges it (verify/verdict.py):
distance (W vs 1), noise (the rank-order twin vs the reference; the larger of both twins' where the run is beyond
the first one's bound, as verify trains the second only then), floor, verdict. Each case is run correct and with each known mistake that applies to it: comm.reduce=sum,
comm.reduce=avg on an uneven split, clipping before averaging (max_norm 0.1, below every rank's gradient norm),
per-rank BatchNorm (models with BatchNorm), rank 0 dropping one step's all_reduce. A broken run's reference is its
own config on one process, where the mistake cannot act: what ``disttrain verify`` of that config would compare.
Step-wise cases are trained with a checkpoint every k steps and retrained segment by segment, each against its twins.
Where a run is within its bounds, the mistake twins (verify/mistakes.py) measure whether it could have told the
weighting mistakes apart, as verify does; the reference records draws from a process generator (verify/draws.py).
The randomness cases (GPT-2 with its default attention dropout, a user's F.dropout) must come out INCONCLUSIVE.
Results are appended to OUT/results.jsonl as they come (the table is printed from it), so an interrupted
measurement keeps what it measured. Interrupted (Ctrl-C, SIGTERM), it closes its worker pools before it exits.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

from disttrain.config import load_config
from disttrain.parallel.env import distributed
from disttrain.verify import verdict as V
from disttrain.verify.drawhook import RecordDraws
from disttrain.verify.draws import describe
from disttrain.verify.mistakes import mistake_twins
from disttrain.verify.report import settle_sensitivity
from disttrain.verify.stepwise import check_segments
from disttrain.verify.twin import RANK_ORDER, SAMPLE_ORDER, train_reference
from disttrain.verify.whole import compare_runs
from tests.harness import WorkerPool
from tests.stepwise_runs import train_run

MLP = ["model.name=mlp", "model.hidden=16", "optim.lr=0.05", "optim.momentum=0.9"]
# Clipped SGD at lr 0.3: chaotic until it fits the data (tests/measure_stepwise.py).
CHAOTIC = ["model.name=mlp", "model.hidden=16", "optim.lr=0.3", "clip.mode=norm", "clip.max_norm=1.0"]
SYNCBN = ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "optim.lr=0.05", "optim.momentum=0.9"]
RESNET = ["model.name=examples.resnet:resnet", "model.norm=syncbn",
          "model.kwargs={width: 4, blocks: [1], dropout: 0.1}", "optim.lr=0.05", "optim.momentum=0.9"]
# Two configs on which the fixed tolerances gave false alarms (correct runs judged NOT EQUIVALENT).
WHY_BF16 = ["model.name=cnn", "model.norm=syncbn", "model.hidden=16", "seed=4", "optim.lr=0.05", "optim.momentum=0.9"]
WHY_FP16 = ["model.name=mlp", "model.hidden=32", "optim.name=adamw", "optim.lr=0.01", "clip.mode=norm",
            "clip.max_norm=1.0"]
# Token models: GPT-2 (transformers, tiny) with its default dropout, and without attention dropout; B=31 over W=3.
TOKENS = ["train.loss=token_cross_entropy", "data.name=tests.factories:padded_tokens", "data.num_classes=13",
          "optim.name=adamw", "optim.lr=0.01"]
GPT2_DROPOUT = ["model.name=tests.random_models:gpt2", "model.kwargs={width: 32, layers: 2}", *TOKENS]
GPT2 = ["model.name=tests.random_models:gpt2", "model.kwargs={width: 32, layers: 2, attn_pdrop: 0.0}", *TOKENS]
F_DROPOUT = ["model.name=tests.random_models:functional_dropout", "optim.lr=0.05"]
PRECISION = {"float64": ["train.dtype=float64"], "float32": ["train.dtype=float32"],
             "bf16": ["train.dtype=float32", "train.precision=bf16"],
             "fp16": ["train.dtype=float32", "train.precision=fp16"]}

# name: (model overrides, precision, W, B, steps, k) -- k None: whole-run verify; k: step-wise, a checkpoint every k.
CASES = {
    "mlp-f64-w2": (MLP, "float64", 2, 32, 20, None),
    "syncbn-f64-w3": (SYNCBN, "float64", 3, 31, 20, None),
    "chaotic-f64-w4-300": (CHAOTIC, "float64", 4, 30, 300, None),
    "resnet-f64-w2": (RESNET, "float64", 2, 15, 20, None),
    "mlp-f32-w3": (MLP, "float32", 3, 31, 20, None),
    "syncbn-f32-w2": (SYNCBN, "float32", 2, 32, 20, None),
    "syncbn-f32-w4-100": (SYNCBN, "float32", 4, 30, 100, None),
    "chaotic-f32-w2-100": (CHAOTIC, "float32", 2, 32, 100, None),
    "chaotic-f32-w3-300": (CHAOTIC, "float32", 3, 31, 300, None),
    "resnet-f32-w3": (RESNET, "float32", 3, 16, 20, None),
    "mlp-bf16-w2": (MLP, "bf16", 2, 31, 20, None),
    "why-bf16-w3": (WHY_BF16, "bf16", 3, 31, 20, None),
    "mlp-bf16-w4-100": (MLP, "bf16", 4, 32, 100, None),
    "syncbn-bf16-w2-100": (SYNCBN, "bf16", 2, 30, 100, None),
    "resnet-bf16-w4": (RESNET, "bf16", 4, 15, 20, None),
    "chaotic-bf16-w2": (CHAOTIC, "bf16", 2, 32, 20, None),
    "mlp-fp16-w3": (MLP, "fp16", 3, 30, 20, None),
    "why-fp16-w4-40": (WHY_FP16, "fp16", 4, 30, 40, None),
    "syncbn-fp16-w2": (SYNCBN, "fp16", 2, 31, 20, None),
    "chaotic-fp16-w3-100": (CHAOTIC, "fp16", 3, 31, 100, None),
    # Seeds where single twins land far from the run (one rank-order twin 15x closer to the reference than the
    # correct run, another 2.5e5x; a sample-order twin 7e4x): the second twin is what keeps them from alarms.
    "syncbn-bf16-w4-40-seed0": (SYNCBN, "bf16", 4, 31, 40, None),
    "syncbn-bf16-w4-40-seed1": ([*SYNCBN, "seed=1"], "bf16", 4, 31, 40, None),
    "chaotic-f32-w4-100": (CHAOTIC, "float32", 4, 30, 100, None),
    "stepwise-mlp-bf16-w3-200-k10": (MLP, "bf16", 3, 31, 200, 10),
    "stepwise-chaotic-f32-w2-k1": (CHAOTIC, "float32", 2, 32, 20, 1),
    "stepwise-chaotic-f32-w3-k10": (CHAOTIC, "float32", 3, 31, 50, 10),
    "stepwise-chaotic-f32-w4-k50": (CHAOTIC, "float32", 4, 30, 100, 50),
    "stepwise-syncbn-bf16-w2-k1": (SYNCBN, "bf16", 2, 31, 12, 1),
    "stepwise-chaotic-f64-w3-k50": (CHAOTIC, "float64", 3, 31, 100, 50),
    # Randomness disttrain does not key: INCONCLUSIVE, correct and broken alike.
    "gpt2-dropout-f64-w3": (GPT2_DROPOUT, "float64", 3, 31, 8, None),
    "fdropout-f32-w2": (F_DROPOUT, "float32", 2, 32, 10, None),
    "stepwise-fdropout-f64-w2-k5": (F_DROPOUT, "float64", 2, 31, 10, 5),
    # Sensitivity: GPT-2 without attention dropout (its nn.Dropout layers keyed), Adam, uneven token counts.
    "gpt2-f64-w3": (GPT2, "float64", 3, 31, 8, None),
    "gpt2-f32-w3": (GPT2, "float32", 3, 31, 8, None),
    "gpt2-bf16-w2": (GPT2, "bf16", 2, 31, 8, None),
    "stepwise-gpt2-f32-w3-k4": (GPT2, "float32", 3, 31, 8, 4),
}


def broken_variants(model: list[str], world_size: int, batch: int, steps: int, k: int | None) -> dict:
    """name -> (extra overrides, skip): the known mistakes that can act on this case."""
    act = steps // 2 if k is None else k * (steps // k // 2)  # a dropped all_reduce: the first step of a segment
    variants = {"reduce=sum": (["comm.reduce=sum"], None)}
    if batch % world_size or "train.loss=token_cross_entropy" in model:  # token counts differ per rank
        variants["avg, uneven slices"] = (["comm.reduce=avg"], None)
    variants["clip before average"] = (["clip.mode=norm", "clip.max_norm=0.1", "clip.before_average=true",
                                        "comm.impl=allreduce"], None)
    if "model.norm=syncbn" in model:
        variants["per-rank bn"] = (["model.norm=bn"], None)
    variants["dropped all_reduce"] = (["comm.impl=allreduce"], (0, act))
    return variants


class Measure:
    def __init__(self, out: Path):
        self.out, self.pools = out, {}
        self.out.mkdir(parents=True, exist_ok=True)

    def config(self, overrides: list[str], steps: int, k: int | None, out: Path):
        every = [f"train.checkpoint_every={k}", "train.keep_checkpoints=0"] if k else []
        return load_config(None, [*overrides, f"train.steps={steps}", "train.device=cpu", f"train.out_dir={out}",
                                  "data.num_samples=256", "comm.timeout_s=120", *every])

    def case(self, name: str, model, precision: str, world_size: int, batch: int, steps: int, k: int | None,
             variant: str, extra: list[str], skip) -> dict:
        base = [*model, *PRECISION[precision], f"train.global_batch_size={batch}", *extra]
        root = self.out / name / variant.replace(" ", "_").replace(",", "").replace("=", "-")
        cfg = self.config(base, steps, k, root / "distributed")
        if world_size not in self.pools:
            self.pools[world_size] = WorkerPool(world_size, timeout=900)
        started = time.perf_counter()
        self.pools[world_size].run(train_run, cfg.to_dict(), skip=skip)
        row = {"case": name, "variant": variant, "precision": precision, "world_size": world_size, "batch": batch,
               "steps": steps, "k": k, "model": model[0].split("=")[1]}
        if k is None:
            draws = RecordDraws(steps=1)
            with distributed("cpu", 120) as env:
                train_reference(self.config(base, steps, k, root / "reference"), env, world_size, hooks=(draws,))
                for kind, name in ((RANK_ORDER, "twin"), (SAMPLE_ORDER, "twin2")):
                    train_reference(self.config(base, steps, k, root / name), env, world_size, kind)
                row["randomness"] = describe(draws.draws) if draws.draws else ""
                first = compare_runs(cfg, root / "distributed", root / "reference", root / "twin")
                # The second twin counts only where verify trains it: the run beyond the first twin's bound.
                twins = [root / "twin", root / "twin2"] if first.wants_second_twin else [root / "twin"]
                report = compare_runs(cfg, root / "distributed", root / "reference", *twins)
                if report.wants_mistakes:  # within the bounds: the mistake twins, as verify runs them
                    found = mistake_twins(self.config(base, steps, k, root / "m"), root, env, world_size,
                                          (report.loss_bound, report.param_bound))
                    row["mistakes"] = [[m.name, m.loss, m.parameters, m.acted] for m in found]
            second = compare_runs(cfg, root / "twin2", root / "reference", root / "twin")  # its noise, shown apart
            row["items"] = [[report.max_param_rel_diff, report.param_noise, report.floor],
                            [report.max_loss_rel_diff, report.loss_noise, report.floor]]
            row["second_twin"] = report.second_twin
            row["sample_order_noise"] = [second.max_param_rel_diff, second.max_loss_rel_diff]
        else:
            segments = [(s, s + k) for s in range(0, steps - k + 1, k)]
            checked = check_segments(cfg, root / "distributed", segments, cfg.train.dtype)
            settle_sensitivity(checked)  # as verify's report does: a mistake seen in any segment is seen
            row["items"] = [[s.param_rel_diff, s.param_noise, s.tolerance] for s in checked]
            row["items"] += [[s.loss_rel_diff, s.loss_noise, s.tolerance] for s in checked]
            row["segment_verdicts"] = [s.verdict for s in checked]  # with each segment's mistake twins
            row["randomness"] = next((s.randomness for s in checked if s.randomness), "")
            row["mistake_twins"] = sum(s.mistakes for s in checked)
        row["seconds"] = round(time.perf_counter() - started, 1)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def judged(row: dict) -> list[list[V.Judgement]]:
    """The (parameters, loss) judgements of a measured case: one pair, or one per step-wise segment, judged with
    the constants of verify/verdict.py as they are now (the floors from FLOOR, not the ones recorded)."""
    items, k = row["items"], row["k"]
    floor = V.FLOOR[row["precision"]] * (k or 1)
    ceiling = V.CEILING.get(row["precision"])
    half = len(items) // 2
    return [[V.judge("parameters", p[0], p[1] if p[1] is not None else 0.0, floor, ceiling),
             V.judge("loss", l[0], l[1] if l[1] is not None else 0.0, floor, ceiling)]
            for p, l in zip(items[:half], items[half:])]


def mistakes_of(row: dict) -> list[V.Mistake] | None:
    return None if "mistakes" not in row else [V.Mistake(*m) for m in row["mistakes"]]


def verdict_of(row: dict) -> tuple[str, float]:
    """The verdict of a measured case and its largest distance / bound."""
    parts = judged(row)
    ratio = max(j.ratio for pair in parts for j in pair)
    if row.get("randomness"):
        return V.INCONCLUSIVE, ratio
    if "segment_verdicts" in row:  # step-wise: each segment judged with its own mistake twins
        return V.combine(row["segment_verdicts"]), ratio
    return V.combine(V.overall(pair, mistakes_of(row)) for pair in parts), ratio


def table(rows: list[dict]) -> str:
    lines = ["| case | precision | W | B | steps | k | variant | loss: distance / noise | parameters: distance / "
             "noise | twins | distance / bound | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        verdict, ratio = verdict_of(row)
        # The pair that decided: the segment with the largest distance / bound.
        p, l = max(judged(row), key=lambda pair: max(j.ratio for j in pair))
        lines.append(f"| {row['case']} | {row['precision']} | {row['world_size']} | {row['batch']} | {row['steps']} | "
                     f"{row['k'] or '-'} | {row['variant']} | {l.distance:.1e} / {l.noise:.1e} | "
                     f"{p.distance:.1e} / {p.noise:.1e} | {2 if row.get('second_twin') else 1} | {ratio:.3g} | "
                     f"{verdict} |")
    correct = [r for r in rows if r["variant"] == "correct"]
    broken = [r for r in rows if r["variant"] != "correct"]
    lines.append("")
    lines.append(f"C = {V.C:g}, margin {V.MARGIN:g}, floors {V.FLOOR}, ceilings {V.CEILING}")
    for label, group in (("correct", [r for r in rows if r["variant"] == "correct"]),
                         ("broken", [r for r in rows if r["variant"] != "correct"])):
        whole = [r for r in group if r["k"] is None]
        lines.append(f"{label}: the second twin ran in {sum(bool(r.get('second_twin')) for r in whole)} of "
                     f"{len(whole)} whole runs")
    for label, group in (("correct", correct), ("broken", broken)):
        verdicts = [verdict_of(r)[0] for r in group]
        lines.append(f"{label}: {len(group)} runs: " + ", ".join(f"{verdicts.count(v)} {v}" for v in
                                                                    (V.EQUIVALENT, V.NOT_EQUIVALENT, V.INCONCLUSIVE)))
        for r in group:
            if verdict_of(r)[0] == V.INCONCLUSIVE:
                lines.append(f"  INCONCLUSIVE: {r['case']} {r['variant']}")
    # What the constants are chosen from: distance / noise of correct runs, and of broken ones (quantity by quantity).
    for label, group in (("correct", correct), ("broken", broken)):
        for q in (0, 1):
            ratios = [pair[q].distance / pair[q].noise for r in group for pair in judged(r) if pair[q].noise]
            dists = [max(pair[q].distance for pair in judged(r)) for r in group]
            name = ("parameters", "loss")[q]
            lines.append(f"{label} {name}: distance / noise max {max(ratios):.3g}, min {min(ratios):.3g}; "
                         f"smallest worst distance {min(dists):.2e}")
    return "\n".join(lines)


SHORT = {V.EQUIVALENT: "EQ", V.NOT_EQUIVALENT: "NOT", V.INCONCLUSIVE: "INC"}
VARIANTS = ("reduce=sum", "avg, uneven slices", "clip before average", "per-rank bn", "dropped all_reduce")


def _noise(j: V.Judgement) -> str:
    return "-" if j.noise is None else f"{j.noise:.1e}"


def sensitivity(row: dict) -> str:
    """Which quantity told each mistake twin apart (P parameters, L loss; "blind": neither), or why none ran."""
    if row.get("randomness"):
        return "draws"
    if "segment_verdicts" in row:
        return f"{row.get('mistake_twins', 0)} mistake twins"
    mistakes = mistakes_of(row)
    if mistakes is None:
        return "-"
    pair = judged(row)[0]
    cells = []
    for m in mistakes:
        seen = m.told_apart_by(pair)
        short = m.name.replace("comm.reduce=", "").replace("per-micro-batch token means", "mb-means")
        cells.append(f"{short}: " + ("unchanged" if not m.acted else "+".join(q[0].upper() for q in seen) or "blind"))
    return ", ".join(cells)


def compact(rows: list[dict]) -> str:
    """One row per case: the correct run (noise, distance / bound, verdict), then each broken variant's verdict
    and distance / bound (EQ, NOT, INC; - where the mistake cannot act)."""
    cases: dict[str, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault(row["case"], {})[row["variant"]] = row
    lines = ["| case | precision | W | B | steps | k | correct: loss noise | parameter noise | distance / bound | "
             "verdict | sensitivity | " + " | ".join(VARIANTS) + " |", "|---" * (11 + len(VARIANTS)) + "|"]
    order = list(CASES)
    for name, variants in sorted(cases.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        row = variants["correct"]
        verdict, ratio = verdict_of(row)
        p, l = max(judged(row), key=lambda pair: max(j.noise or 0.0 for j in pair))
        cells = []
        for v in VARIANTS:
            if v in variants:
                bv, br = verdict_of(variants[v])
                cells.append(f"{SHORT[bv]} {br:.2g}")
            else:
                cells.append("-")
        lines.append(f"| {name} | {row['precision']} | {row['world_size']} | {row['batch']} | {row['steps']} | "
                     f"{row['k'] or '-'} | {_noise(l)} | {_noise(p)} | {ratio:.2g} | {SHORT[verdict]} | "
                     f"{sensitivity(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.measure_verdicts", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/verdicts-measure"))
    parser.add_argument("--only", nargs="+", default=None, help="the cases to measure (default: all)")
    parser.add_argument("--table", action="store_true", help="print the table of the saved results, measure nothing")
    parser.add_argument("--compact", action="store_true", help="one row per case (with --table)")
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    if not args.table:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        torch.set_num_threads(1)
        measure = Measure(args.out)
        started = time.perf_counter()
        try:
            for name, (model, precision, w, b, steps, k) in CASES.items():
                if args.only and name not in args.only:
                    continue
                variants = {"correct": ([], None), **broken_variants(model, w, b, steps, k)}
                for variant, (extra, skip) in variants.items():
                    row = measure.case(name, model, precision, w, b, steps, k, variant, extra, skip)
                    verdict, ratio = verdict_of(row)
                    print(f"{name} {variant}: {verdict} (distance / bound {ratio:.3g}, {row['seconds']} s)", flush=True)
        finally:
            measure.close()
        print(f"\nmeasured in {time.perf_counter() - started:.0f} s\n")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print(compact(rows) if args.compact else table(rows))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("measure_verdicts: interrupted", file=sys.stderr)
        sys.exit(130)

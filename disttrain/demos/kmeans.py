"""The same principle outside deep learning: distributed k-means.

Points from a few Gaussian blobs are sharded over W processes, unevenly and not at random (each machine
mostly holds points of a few blobs, as data collected in different places does). Every iteration of Lloyd's
algorithm each rank assigns its points to the nearest centroid and computes per-cluster sums and counts; the
merge is then either

- count-weighted: one all_reduce of [sums, counts] packed together, centroid = total sum / total count, which
  is exactly the single-machine update; or
- equal-weight: every rank's own centroids (sum / count; a cluster it has no point of keeps the current
  centroid) averaged over the ranks with weight 1/W, as if each machine were as large as the others.

Both start from the same seeded initial centroids (k-means++) as a single-machine k-means on all points, in
float64.
The single-machine run and the per-rank work share one function (:func:`lloyd`); only the merge differs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..parallel.collectives import sum_over_ranks
from ..parallel.env import DistEnv
from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, sci
from .figures import new_figure, save

NAME = "kmeans"
QUESTION = "Does the same principle hold outside deep learning, for k-means?"
CLAIM = ("distributed k-means with a count-weighted merge (one all_reduce of per-cluster sums and counts) equals "
         "single-machine k-means, while averaging the per-machine centroids with equal weight does not")
K = 5
Merge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_points(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points, blob of each point, initial centroids): K blobs in 2-D, float64, seeded (the same on every rank)."""
    rng = np.random.default_rng([seed, 5])
    angles = 2 * np.pi * np.arange(K) / K
    centers = 7.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    blob = rng.integers(0, K, n)
    points = centers[blob] + rng.normal(0, 0.9 + 0.35 * blob[:, None], size=(n, 2))  # blobs of different spread
    order = np.argsort(blob + rng.uniform(-0.8, 0.8, n), kind="stable")  # sorted by blob, with some mixing
    points, blob = points[order], blob[order]
    return torch.from_numpy(points), torch.from_numpy(blob), torch.from_numpy(kmeans_plus_plus(points, rng))


def kmeans_plus_plus(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """K initial centroids by k-means++ (each next one drawn with probability ~ squared distance to the nearest
    one chosen so far), from a seeded generator: the same on every rank."""
    chosen = [points[rng.integers(len(points))]]
    d2 = ((points - chosen[0]) ** 2).sum(1)
    for _ in range(K - 1):
        chosen.append(points[rng.choice(len(points), p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((points - chosen[-1]) ** 2).sum(1))
    return np.stack(chosen)


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Uneven contiguous shards: rank r holds a share proportional to r + 1 (for 4 ranks 10%, 20%, 30%, 40%)."""
    weights = np.arange(1, world_size + 1, dtype=np.float64)
    return [0, *np.round(np.cumsum(weights) / weights.sum() * n).astype(int).tolist()]


def lloyd(points: torch.Tensor, init: torch.Tensor, iters: int, merge: Merge) -> torch.Tensor:
    """``iters`` Lloyd iterations; ``merge(sums, counts, centroids)`` turns this process's per-cluster sums and
    counts into the next centroids (on one machine: sums / counts)."""
    centroids = init.clone()
    for _ in range(iters):
        assign = torch.cdist(points, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=len(centroids)).to(points.dtype)
        centroids = merge(sums, counts, centroids)
    return centroids


def local_merge(sums: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """sums / counts; an empty cluster keeps its centroid."""
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)


def kmeans_task(env: DistEnv, n: int, iters: int) -> dict[str, list]:
    """On every rank: k-means on this rank's shard, with both merges; every rank ends with the same centroids."""
    points, _, init = make_points(n)
    bounds = shard_bounds(n, env.world_size)
    shard = points[bounds[env.rank]:bounds[env.rank + 1]]

    def count_weighted(sums: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        # One collective: sums and counts packed side by side, so the weights travel with the sums.
        total = sum_over_ranks(torch.cat([sums, counts[:, None]], dim=1), env)
        return local_merge(total[:, :-1], total[:, -1], centroids)

    def equal_weight(sums: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(local_merge(sums, counts, centroids), env) / env.world_size

    return {"count_weighted": lloyd(shard, init, iters, count_weighted).tolist(),
            "equal_weight": lloyd(shard, init, iters, equal_weight).tolist()}


def inertia(points: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances to the nearest centroid: what k-means minimises."""
    return torch.cdist(points, centroids).min(1).values.square().sum().item()


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w, quick = lab.settings.nproc, lab.settings.quick
    n, iters = (2000, 10) if quick else (6000, 20)
    merged = lab.call(w, kmeans_task, n, iters)

    def finish() -> Result:
        points, blob, init = make_points(n)
        single = lloyd(points, init, iters, local_merge)
        cents = {k: torch.tensor(v, dtype=torch.float64) for k, v in merged.value.items()}
        scale = single.abs().max().item()
        dev = {k: (c - single).abs().max().item() / scale for k, c in cents.items()}
        cost = {"single": inertia(points, single), **{k: inertia(points, c) for k, c in cents.items()}}
        bounds = shard_bounds(n, w)
        sizes = [bounds[r + 1] - bounds[r] for r in range(w)]
        checks = [
            Check(f"count-weighted merge: deviation from single-machine k-means {sci(dev['count_weighted'])} <= "
                  f"{EQUAL:.0e}", at_most(dev["count_weighted"], EQUAL)),
            Check(f"equal-weight merge: deviation {sci(dev['equal_weight'])} >= {DIFFERENT:.0e}",
                  at_least(dev["equal_weight"], DIFFERENT)),
        ]
        summary = (f"With {n} points on {w} machines holding {', '.join(map(str, sizes))}, the count-weighted merge "
                   f"gives the single-machine centroids (deviation {sci(dev['count_weighted'])}), while the "
                   f"equal-weight average of per-machine centroids is off by {sci(dev['equal_weight'])} and its "
                   f"clustering costs {cost['equal_weight'] / cost['single']:.3g}x as much (sum of squared distances).")
        table = [["merge", "deviation from single machine", "sum of squared distances"]]
        table += [["single machine (Lloyd)", "-", f"{cost['single']:.6g}"],
                  ["count-weighted: all_reduce [sums, counts]", sci(dev["count_weighted"]), f"{cost['count_weighted']:.6g}"],
                  ["equal-weight: mean of per-rank centroids", sci(dev["equal_weight"]), f"{cost['equal_weight']:.6g}"]]
        plots = [_plot(out, points, bounds, single, cents, init)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"{n} points from {K} Gaussian blobs (float64), sharded over W={w} processes in contiguous, "
                        f"uneven, blob-sorted shards of {', '.join(map(str, sizes))} points; {iters} iterations of "
                        f"Lloyd's algorithm from the same {K} seeded initial centroids, with each merge, and on one "
                        "machine with all points. Deviation: max |c - c_single| / max |c_single|."),
            numbers={"world_size": w, "points": n, "iterations": iters, "shard_sizes": sizes, "deviation": dev,
                     "inertia": cost, "centroids": {"single": single.tolist(), **merged.value}})

    return finish


def _plot(out: Path, points: torch.Tensor, bounds: list[int], single: torch.Tensor, cents: dict,
          init: torch.Tensor) -> str:
    fig, (shard_ax, cluster_ax) = new_figure(2, (12.0, 5.2))
    p = points.numpy()
    w = len(bounds) - 1
    for r in reversed(range(w)):  # the smallest shard on top
        part = p[bounds[r]:bounds[r + 1]]
        shard_ax.scatter(part[:, 0], part[:, 1], s=3, alpha=0.5, color=f"C{r}", label=f"rank {r}: {len(part)} points")
    handles, labels = shard_ax.get_legend_handles_labels()
    shard_ax.legend(handles[::-1], labels[::-1], fontsize="small", markerscale=4)
    shard_ax.set_title(f"the data as sharded over {w} machines")
    assign = torch.cdist(points, single).argmin(1).numpy()
    cluster_ax.scatter(p[:, 0], p[:, 1], c=assign, cmap="tab10", s=3, alpha=0.35, vmin=0, vmax=9)
    c = single.numpy()
    cluster_ax.scatter(c[:, 0], c[:, 1], marker="X", s=260, color="black", label="single machine")
    cw = cents["count_weighted"].numpy()
    cluster_ax.scatter(cw[:, 0], cw[:, 1], marker="o", s=45, color="gold", edgecolors="black", linewidths=1,
                       label="count-weighted merge")
    ew = cents["equal_weight"].numpy()
    cluster_ax.scatter(ew[:, 0], ew[:, 1], marker="^", s=140, color="#d62728", edgecolors="black",
                       label="equal-weight merge")
    i = init.numpy()
    cluster_ax.scatter(i[:, 0], i[:, 1], marker="+", s=120, color="gray", label="initial centroids")
    cluster_ax.set_title("clusters (single machine) and the centroids of each merge")
    cluster_ax.legend(fontsize="small", loc="best")
    for ax in (shard_ax, cluster_ax):
        ax.set_xlabel("x (first coordinate)")
        ax.set_ylabel("y (second coordinate)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    return save(fig, out, "kmeans.png")

"""What a launch of the checked script left behind (hook.py wrote it): per rank, per optimizer step, the
parameters and the samples; at the end, what the process saw (optimizers, dtypes, modules, the process group).

A script is just another source of per-step states: the checker reads them step by step (a 10M-parameter model's
step is 40 MB per rank in float32), never all at once.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import torch

from .launch import Run, ScriptError

_FILE = re.compile(r"o(\d+)_s(\d+)\.pt$")


class Records:
    """The records of one launch (the W ranks, the reference, or a twin)."""

    def __init__(self, run: Run):
        self.run, self.nproc, self.role = run, run.nproc, run.role
        self.metas = [self._meta(rank) for rank in range(run.nproc)]

    def _meta(self, rank: int) -> dict[str, Any]:
        path = self.run.out / f"rank{rank}" / "meta.pt"
        meta = torch.load(path, weights_only=False) if path.is_file() else {}
        if not meta.get("steps"):  # ended before any step (or killed): count the files
            counts: Counter = Counter()
            for name in os.listdir(path.parent) if path.parent.is_dir() else []:
                if (m := _FILE.match(name)) and int(m.group(2)) > 0:
                    counts[int(m.group(1))] += 1
            meta["steps"] = dict(counts)
        return meta

    def steps(self, rank: int) -> int:
        """Steps every optimizer of this rank took (the recorded rounds)."""
        counts = self.metas[rank].get("steps", {})
        return min(counts.values()) if counts else 0

    @property
    def optimizers(self) -> list[int]:
        return sorted(self.metas[0].get("steps", {}))

    def names(self) -> dict[str, str]:
        return self.metas[0].get("names", {})

    def params(self, rank: int, step: int) -> dict[str, torch.Tensor]:
        """Every recorded parameter after ``step`` steps (0: before the first), as float64 (exact)."""
        state: dict[str, torch.Tensor] = {}
        for index in self.optimizers:
            record = torch.load(self.run.out / f"rank{rank}" / f"o{index}_s{step}.pt", weights_only=False)
            state.update({k: v.double() for k, v in record["params"].items()})
        return state

    def samples(self, rank: int, step: int) -> list[str]:
        record = torch.load(self.run.out / f"rank{rank}" / f"o{self.optimizers[0]}_s{step}.pt", weights_only=False)
        return record.get("samples", [])

    def kind(self) -> str:
        """The precision the verdict's floor is read for: bf16/fp16 (autocast or half parameters), float64, or
        float32."""
        meta = self.metas[0]
        dtypes, autocast = set(meta.get("dtypes", [])), meta.get("autocast")
        if autocast in ("bfloat16", "float16") or dtypes & {"bfloat16", "float16"}:
            return "bf16" if "bfloat16" in {autocast, *dtypes} else "fp16"
        return "float64" if dtypes == {"float64"} else "float32"

    def modules(self, kind: str) -> Counter:
        """Modules of ``kind`` ("dropout", "batchnorm") that ran in a training forward on any rank: class -> count."""
        found: Counter = Counter()
        for meta in self.metas:
            for (k, cls, p), n in meta.get("modules", {}).items():
                if k == kind:
                    key = cls if kind != "dropout" else f"{cls}(p={p:g})"
                    found[key] = max(found[key], n)
        return found


def check_steps(run: Records, ref: Records, steps: int, script: str) -> None:
    """Refuse, in one line, runs that cannot be compared: ranks that stepped differently, too few steps, other
    parameters in the reference."""
    counts = [run.steps(r) for r in range(run.nproc)]
    if len(set(counts)) > 1:
        raise ScriptError(f"{script} stepped its optimizers a different number of times on different ranks ("
                          + ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts)) + ")")
    for records, who, n in ((run, "on every rank", counts[0]), (ref, "in the reference", ref.steps(0))):
        if n == 0:
            raise ScriptError(f"{script} ended {who} without an optimizer step: nothing to compare")
        if n < steps:
            raise ScriptError(f"{script} stepped its optimizer {n} times {who}, fewer than --steps {steps} (lower "
                              "--steps, or let the script train longer)")
    keys, ref_keys = run.params(0, 0).keys(), ref.params(0, 0).keys()
    if keys != ref_keys:
        raise ScriptError(f"{script}: the reference's optimizers hold {len(ref_keys)} parameters, the ranks' "
                          f"{len(keys)}: the two runs train different models")


__all__ = ["Records", "check_steps"]

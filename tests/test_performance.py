"""The arithmetic and command lines of the benchmarks in docs/performance-gpu.md (no timing: they print numbers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from disttrain.bench.launch import NPROC, TORCHRUN, command
from disttrain.bench.step import EAGER, compile_result


def test_bench_launch_starts_the_same_training_both_ways():
    config, out = Path("c.yaml"), Path("out")
    nproc, torchrun = command(NPROC, config, 2, out), command(TORCHRUN, config, 2, out)
    train = ["disttrain", "train", "c.yaml", "--set", "train.out_dir=out"]
    assert nproc == [sys.executable, "-m", *train, "--nproc", "2"]
    assert torchrun == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", *train]


def test_compile_time_is_the_first_compiled_step_less_an_eager_first_step():
    # Two ranks, two rounds: the slowest rank's median per round, compiled over eager.
    per_rank = [{"disttrain": [[1.0, 1.0], [2.0, 2.0]], EAGER: [[2.0, 2.0], [2.0, 2.0]]},
                {"disttrain": [[1.0, 1.0], [1.0, 1.0]], EAGER: [[4.0, 4.0], [2.0, 2.0]]}]
    first = [{"disttrain": [30.0, 0.5], EAGER: [0.4, 0.6]}, {"disttrain": [20.0, 0.5], EAGER: [0.5, 0.5]}]
    result = compile_result(per_rank, first)
    assert result["compiled_round_ratios"] == [0.25, 1.0]
    assert result["compiled_over_eager"] == pytest.approx(0.625)
    assert result["compile_s"] == pytest.approx(29.5)

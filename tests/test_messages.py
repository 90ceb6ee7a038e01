"""What the command line says where a newcomer looks: the CPU fallback, where a run went, padding-heavy token
batches, long verify tables, one line per user error under torchrun, and --against checked before the header.
In-process and cheap: one two-step training run, no worker group.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from disttrain.cli.main import main
from disttrain.errors import ConfigError, run_command
from disttrain.observe.metrics import MetricsLogger
from disttrain.parallel.env import DistEnv, choose_device
from disttrain.verify.report import Segment, summarize
from disttrain.verify.whole import compare_states

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_auto_without_any_gpu_says_it_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto", 0, 1) == (torch.device("cpu"),
                                           "train.device=auto: no CUDA device visible: running on the CPU with gloo")
    assert choose_device("cpu", 0, 1) == (torch.device("cpu"), None)  # asked for: nothing to say


def test_a_training_run_says_once_where_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", str(DEMO), "--set", "train.steps=2", "--set", "train.checkpoint_every=0",
                 "--set", f"train.out_dir={out}"]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.out.splitlines() if line.startswith("wrote ")]
    assert said == [f"wrote {out / 'final.pt'} (the model after step 2); the run directory {out} also holds "
                    "metrics.jsonl and config.yaml"]
    assert (out / "final.pt").is_file()
    assert captured.err.count("no CUDA device visible: running on the CPU with gloo") == 1  # once, on stderr


def _logger(tmp_path: Path, positions: int) -> tuple[MetricsLogger, io.StringIO]:
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    stream = io.StringIO()
    return MetricsLogger(tmp_path, env, 10, 5, stream=stream, token_positions=positions, seq_len=64), stream


def _record(step: int, tokens: int) -> dict:
    return {"step": step, "loss": 1.0, "tokens": tokens, "lr": 0.1}


def test_mostly_padded_token_batches_are_said_once(tmp_path):
    logger, stream = _logger(tmp_path, 32 * 64)
    logger.log(_record(0, 164), _record(1, 100))
    logger.log(_record(2, 90))
    notes = [line for line in stream.getvalue().splitlines() if line.startswith("data:")]
    assert notes == ["data: step 1 has 164 target tokens in 2048 positions (8%): most documents are shorter than "
                     "data.seq_len=64 and the rest is padding; data.pack=true or a smaller data.seq_len uses more "
                     "of each step"]
    full, stream = _logger(tmp_path / "full", 32 * 64)
    full.log(_record(0, 2000))
    assert "data:" not in stream.getvalue()


def test_a_user_error_under_torchrun_is_said_by_local_rank_0(monkeypatch, capsys):
    """The other ranks wait for torchrun to stop them (rank 0 exits first with 2); one still running after the
    wait says the error itself, with the same exit code."""
    waits = []
    monkeypatch.setattr("time.sleep", waits.append)

    def fail() -> int:
        raise ConfigError("train.device=cuda but CUDA is not available on this machine")

    for rank, waited in (("0", []), ("1", [7.0])):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        waits.clear()
        assert run_command(fail, quiet_wait_s=7.0) == 2
        assert waits == waited
        assert capsys.readouterr().err == ("disttrain: error: train.device=cuda but CUDA is not available on this "
                                           "machine\n")


def test_verify_against_a_missing_run_is_one_line_without_the_header(tmp_path, capsys):
    assert main(["verify", str(DEMO), "--against", str(tmp_path / "nonexistent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"disttrain: error: --against {tmp_path / 'nonexistent'}: no final.pt there (train into it first)"]


def _state(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, x], dtype=torch.float64)}


def test_a_long_whole_run_table_shows_the_ends_and_the_worst_steps():
    ref = [1.0 / (1 + i) for i in range(1000)]
    run = [v + (1e-12 if i == 500 else 0.0) for i, v in enumerate(ref)]
    report = compare_states(3, _state(2.0), _state(2.0), run, ref, dtype="float64", reference_world_size=2)
    lines = report.table().splitlines()
    assert len(lines) < 60
    assert lines[0].split() == ["step", "loss", "(W=3)", "loss", "(W=2)", "rel", "diff"]
    assert any(line.split()[0] == "500" for line in lines)  # the worst step is kept
    assert [line.split()[0] for line in lines[1:11]] == [str(i) for i in range(10)]
    assert any("steps left out" in line for line in lines)
    assert any(line.startswith("(21 of 1000 steps shown: the first 10, the last 10") for line in lines)
    assert lines[-1].startswith("verdict: EQUIVALENT: 3 processes match 2 processes on the global batch")
    short = compare_states(2, _state(2.0), _state(2.0), ref[:20], ref[:20], dtype="float64")
    assert len([line for line in short.table().splitlines() if line[:5].strip().isdigit()]) == 20
    assert "W=1" in short.table().splitlines()[0]


def test_a_long_stepwise_table_is_summarised_too():
    segments = [Segment(start=10 * i, stop=10 * (i + 1), world_size=3, param_rel_diff=1e-9 * (i == 42), worst_param="w",
                        loss_rel_diff=0.0, optimizer_rel_diff=0.0, tolerance=1e-5, passed=True) for i in range(100)]
    from disttrain.config import load_config

    report = summarize(load_config(DEMO, []), Path("runs/x"), segments, "float64", "cpu", 1.0, 1)
    lines = report.table().splitlines()
    assert len(lines) < 50 and any(line.split()[:3] == ["420", "->", "430"] for line in lines)
    assert any("segments shown" in line for line in lines)
    assert math.isfinite(report.margin)


@pytest.mark.parametrize("values, kept", [([0.0] * 5, 5), ([0.0] * 50 + [1.0] * 10 + [0.0] * 40, 30),
                                          ([0.0] * 50 + [float("nan")] + [1.0] * 49, 20 + 10)])
def test_shown_rows_keep_short_tables_whole_and_the_worst_of_long_ones(values, kept):
    from disttrain.verify.rows import shown_rows

    rows = shown_rows(values)
    assert len(rows) == kept and rows == sorted(rows) and 0 in rows
    if len(values) > 40:
        assert max(range(len(values)), key=lambda i: (values[i] != values[i], values[i])) in rows

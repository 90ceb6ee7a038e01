"""disttrain check: any script at W ranks against one process, through the command line as docs/check.md shows it.

Every check starts W + 1 (+ a twin below float64) Python processes that import torch: a few seconds each on 2
cores. The cases are few and small (4-layer models, 3 steps, W=2); each test runs several. The twins' decision and
the verdicts' exit codes are also checked on records written by the test, with no process started.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from disttrain.check.hook import strip_wrappers
from disttrain.check.samples import apply_rows, fingerprints
from disttrain.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def check(capsys, *args: str) -> subprocess.CompletedProcess:
    """``disttrain check ARGS`` through the CLI's entry point in this process (the script's processes are launched)."""
    capsys.readouterr()
    code = cli_main(["check", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["disttrain", "check", *args], code, out.out, out.err)


def test_samples_are_rows_and_padding_is_not_part_of_them():
    a = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                [1, 1, 0, 0]])}
    b = {"input_ids": torch.tensor([[4, 5, 9]]), "attention_mask": torch.tensor([[1, 1, 0]])}  # padded otherwise
    assert fingerprints((), a)[1] == fingerprints((), b)[0]
    assert len(set(fingerprints((torch.arange(6.0).reshape(3, 2),), {}))) == 3
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    order = torch.tensor([2, 0, 3, 1])
    px, py = apply_rows((x, y), lambda t: t[order])
    assert sorted(fingerprints((px, py), {})) == sorted(fingerprints((x, y), {}))  # a twin sees the same samples
    assert strip_wrappers("module._forward_module.net._orig_mod.0.weight") == "net.0.weight"


class _Samples:
    """Records' stand-in: samples per rank and step."""

    def __init__(self, per_rank: list[list[list[str]]]):
        self.per_rank, self.nproc = per_rank, len(per_rank)

    def samples(self, rank: int, step: int) -> list[str]:
        return self.per_rank[rank][step - 1]


def test_data_differences_are_named():
    from disttrain.check.compare import _data

    ref = _Samples([[list("abcd"), list("efgh")]])
    assert _data(_Samples([[list("ab"), list("ef")], [list("cd"), list("gh")]]), ref, 2).first_step is None
    padded = _data(_Samples([[list("ab"), list("ef")], [list("bc"), list("gh")]]), ref, 2)
    assert padded.first_step == 1 and "1 samples on more than one rank" in padded.line
    assert "1 of the reference's samples on no rank" in padded.line
    repeated = _data(_Samples([[list("ab"), list("ef")], [list("cc"), list("gh")]]), ref, 2)
    assert "more often than in the reference's batch" in repeated.line
    shuffled = _data(_Samples([[list("ae"), list("bf")], [list("cd"), list("gh")]]), ref, 2)
    assert shuffled.first_step == 1 and "in the reference's other batches" in shuffled.line
    smaller = _data(_Samples([[list("a"), list("e")], [list("c"), list("g")]]), ref, 2)
    assert "differ in size" in smaller.line


def test_the_update_ratio_names_a_sum_a_division_and_a_reweighting():
    from types import SimpleNamespace

    from disttrain.check.compare import Ratio
    from disttrain.check.report import _ratio_hint

    run = SimpleNamespace(metas=[{"optimizers": {0: "SGD"}}])
    hint = lambda scales, residual=0.0: _ratio_hint(Ratio(scales, residual), 1, 2, run, 1e-8)  # noqa: E731
    assert "(x2 = W)" in hint({"a": 2.0, "b": 2.0 + 1e-12})
    assert "(x1/2)" in hint({"a": 0.5, "b": 0.5})
    assert "non-uniform" in hint({"a": 0.995, "b": 0.998})
    assert "non-uniform" in hint({"a": 2.0, "b": 2.0}, residual=0.3)  # the same scale, another direction


def test_plain_ddp_equivalent_in_float64_and_float32_and_a_sum_is_not(capsys):
    ok = check(capsys, "--nproc", "2", "--steps", "3", "--json", "--reference-args", "--batch 32", "--",
               str(EXAMPLES / "check_ddp.py"), "--batch", "16")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["verdict"] == "EQUIVALENT" and report["data_step"] is None and report["replica_step"] is None
    assert report["kind"] == "float64" and report["twins"] == 0 and len(report["rows"]) == 4
    assert max(r["distance"] for r in report["rows"]) < 1e-13
    f32 = check(capsys, "--nproc", "2", "--steps", "3", "--json", "--reference-args", "--batch 32", "--",
                str(EXAMPLES / "check_ddp.py"), "--batch", "16", "--dtype", "float32")
    assert f32.returncode == 0, f32.stderr
    report = json.loads(f32.stdout)
    assert report["kind"] == "float32" and report["twins"] >= 1 and report["verdict"] == "EQUIVALENT"
    bad = check(capsys, "--nproc", "2", "--steps", "3", "--reference-args", "--batch 32", "--",
                str(EXAMPLES / "check_ddp.py"), "--batch", "16", "--reduction", "sum")
    assert bad.returncode == 1, bad.stderr
    assert "verdict:  NOT EQUIVALENT" in bad.stdout and "x0.5 the reference's in every tensor (x1/2)" in bad.stdout


def test_disttrain_train_itself_is_equivalent(capsys, tmp_path):
    result = check(capsys, "--nproc", "2", "--steps", "3", "--reference-args",
                   f"--set train.out_dir={tmp_path / 'reference'}", "--", "-m", "disttrain", "train",
                   str(ROOT / "configs" / "demo.yaml"), "--set", f"train.out_dir={tmp_path / 'ranks'}")
    assert result.returncode == 0, result.stderr
    assert "verdict:  EQUIVALENT" in result.stdout and "data:     EQUAL" in result.stdout


def test_hugging_face_trainer_with_and_without_average_tokens_across_devices(capsys, tmp_path):
    pytest.importorskip("transformers")
    common = ["--nproc", "2", "--steps", "3", "--reference-args", "--batch 8", "--", str(EXAMPLES / "check_hf.py"),
              "--batch", "4", "--out", str(tmp_path)]
    ok = check(capsys, *common)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = check(capsys, *common, "--no-average-tokens")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "non-uniform" in bad.stdout and "data:     EQUAL" in bad.stdout


def test_fsdp2_loop_is_equivalent(capsys):
    result = check(capsys, "--nproc", "2", "--steps", "3", "--reference-args", "--batch 32", "--",
                   str(EXAMPLES / "check_fsdp.py"), "--batch", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replicas: EQUAL" in result.stdout


def test_lightning_ddp_is_equivalent_and_one_device_with_strategy_auto_reads_other_batches(capsys):
    pytest.importorskip("lightning")
    script = [str(EXAMPLES / "check_lightning.py"), "--devices", "2", "--batch", "16"]
    ok = check(capsys, "--nproc", "2", "--steps", "3", "--reference-args", "--devices 1 --batch 32", "--", *script)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = check(capsys, "--nproc", "2", "--steps", "3", "--reference-args",
                  "--devices 1 --strategy auto --batch 32", "--", *script)
    assert other.returncode == 1, other.stdout + other.stderr
    assert "data:     DIFFER from step 1" in other.stdout and "samples the reference never saw" in other.stdout


def _recorded(run, steps: int, offset: float) -> None:
    """What the hook would have left for ``run``: float32 parameters ``(1 + step) * (1 + offset)`` after each step
    (a relative distance of ``offset`` from the reference's), each rank's slice of the samples a b c d."""
    from collections import Counter

    for rank in range(run.nproc):
        rank_dir = run.out / f"rank{rank}"
        rank_dir.mkdir(parents=True)
        mine = list("abcd")[rank * 4 // run.nproc:(rank + 1) * 4 // run.nproc]
        for step in range(steps + 1):
            params = {"w": torch.full((4,), (1.0 + step) * (1.0 + (offset if step else 0.0)))}
            torch.save({"params": params, "samples": [f"{s}{step}" for s in mine] if step else []},
                       rank_dir / f"o0_s{step}.pt")
        torch.save({"how": "done", "steps": {0: steps}, "names": {"w": "w"}, "dtypes": ["float32"],
                    "optimizers": {0: "SGD"}, "group_size": run.nproc if run.nproc > 1 else 0, "draws": "",
                    "draw_list": [], "autocast": None, "modules": Counter(), "batches_permuted": 0},
                   rank_dir / "meta.pt")


@pytest.mark.parametrize("distance, second_noise, verdict, code", [
    (5e-7, None, "EQUIVALENT", 0),  # within the first twin's bound (max(4 x 2e-7, 1e-6)): no second twin
    (3e-6, 1e-6, "EQUIVALENT", 0),  # beyond it; the second twin's larger noise widens the bound to 4e-6
    (1e-5, 6e-7, "INCONCLUSIVE", 3),  # beyond 4 x 6e-7 but within MARGIN x that: rounding cannot be ruled out
    (1e-4, 6e-7, "NOT EQUIVALENT", 1),
])
def test_a_second_twin_runs_only_beyond_the_first_twins_bound_and_the_larger_noise_decides(
        capsys, monkeypatch, tmp_path, distance, second_noise, verdict, code):
    """The twins' decision and the verdict through the command line, on records written here (no process: the
    launches are replaced by what the hook would have recorded). float32: the first twin is always run."""
    from disttrain.check import launch, run as check_run

    offsets = {"run": distance, "reference": 0.0, "twin 1": 2e-7, "twin 2": second_noise}
    started = []

    def start(role, command, nproc, steps, out, permute=None):
        started.append(role)
        run = launch.Run(role, command, nproc, out)
        _recorded(run, steps, offsets[role])
        return run

    monkeypatch.setattr(check_run, "start", start)
    script = tmp_path / "train.py"
    script.write_text("")
    result = check(capsys, "--nproc", "2", "--steps", "3", "--json", "--", str(script))
    report = json.loads(result.stdout)
    assert (report["verdict"], result.returncode) == (verdict, code), result.stdout + result.stderr
    assert started == ["run", "reference", "twin 1"] + (["twin 2"] if second_noise is not None else [])
    assert report["twins"] == len(started) - 2 and report["kind"] == "float32"
    assert report["data_step"] is None and report["replica_step"] is None
    noise = max(r["noise"] for r in report["rows"][1:])  # the larger twin's, per step (float32 rounds the offsets)
    assert noise == pytest.approx(max(2e-7, second_noise or 0.0), rel=0.25)
    assert report["bound"] == pytest.approx(max(4 * noise, 1e-6))


BAD = {  # script body -> (check options, the message's part)
    "raises": ("""
        import os, torch
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(5):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            if step == 1 and os.environ["RANK"] == "1":
                raise ValueError("broken on purpose")
        """, ["--steps", "4"], "failed on rank 1: ValueError: broken on purpose"),
    "hangs": ("import time\ntime.sleep(60)\n", ["--timeout", "2"], "no optimizer step within 2 s"),
    "uneven": ("""
        import os, torch
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3 + int(os.environ["RANK"])):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        """, ["--steps", "6"], "a different number of times on different ranks (rank 0: 3, rank 1: 4)"),
    "uneven_ddp": ("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2 + int(os.environ["RANK"])):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        """, ["--steps", "5"], "different number of times on different ranks: rank 0 ended after 2 optimizer steps"),
    "short": ("""
        import torch
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        """, ["--steps", "3"], "stepped its optimizer 2 times on every rank, fewer than --steps 3"),
}


def test_bad_scripts_fail_in_one_line_and_leave_nothing_running(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the output a failed check keeps for its message
    for name, (body, options, message) in BAD.items():
        script = tmp_path / f"{name}.py"
        script.write_text(textwrap.dedent(body))
        result = check(capsys, "--nproc", "2", *options, "--", str(script))
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("disttrain: error:")]
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert not _running(script), name
    assert check(capsys, "--nproc", "2", "--", str(tmp_path / "missing.py")).returncode == 2
    assert check(capsys, "--nproc", "1", "--", str(tmp_path / "short.py")).returncode == 2


def test_a_failed_run_waits_only_for_its_own_peers_that_may_still_fail(tmp_path):
    """After a rank fails, the check waits (a few seconds at most) for the run's peers that have neither ended nor
    recorded their steps: one of them may have failed first. A peer waiting in the hook's barrier cannot fail any
    more, and the reference and the twins are not judged once a run failed."""
    from disttrain.check.launch import Run, _settled

    run = Run("run", ["python", "x.py"], 2, tmp_path, ended=[12.0, None])
    assert not _settled(run)  # rank 1 still runs: it may be the one that failed first
    (tmp_path / "rank1").mkdir()
    (tmp_path / "rank1" / "done").write_text("")
    assert _settled(run)  # rank 1 recorded its steps and waits for rank 0, which will never come
    assert _settled(Run("reference", ["python", "x.py"], 1, tmp_path / "ref", ended=[3.0]))


def _running(script: Path) -> list[int]:
    """Processes whose command line names ``script``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(script) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            continue
    return found

"""The checks of tools/gpu_check.sh: one line per check, a summary, and a JSON file (run it through the script).

    python tools/gpu_checks.py [--json FILE] [--suite]

Each check runs as its own processes with a time limit (their sum is 7 minutes; they take less), so a hang or a
crash is one failed line and the others still run. ``--suite``: also the whole test suite (minutes more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
PY = sys.executable
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+)")


class Skip(Exception):
    """A check that does not apply to this machine (said why)."""


def _run(cmd: list[str], limit: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd[-6:])}: {tail[0][:200]}")
    return done


def _torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "disttrain"]


def device() -> str:
    import torch

    p = torch.cuda.get_device_properties(0)
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.device_count()} x "
            f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")


def nccl_group_of_one(impl: str, limit: float) -> str:
    """torchrun, one rank on cuda:0: the group is cpu:gloo,cuda:nccl, comm.force_collectives builds the strategy and
    SyncBN's collectives although W=1, the stop hook is installed; SIGTERM mid-run, then --resume to the end (the
    per-tensor broadcast of the checkpoint's state)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["--set", f"train.out_dir={tmp}", "--set", "train.device=cuda", "--set", f"comm.impl={impl}",
                "--set", "comm.force_collectives=true", "--set", "train.log_every=1000", "--set",
                "train.checkpoint_every=1000", "--set", "train.tensorboard=false"]
        start = time.monotonic()
        proc = subprocess.Popen([*_torchrun(1), "train", DEMO, *sets, "--set", "train.steps=100000"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        metrics = Path(tmp) / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            if proc.poll() is not None or time.monotonic() - start > limit / 2:
                proc.kill()
                out, err = proc.communicate()
                raise RuntimeError(f"no steps logged: {(err or out).strip().splitlines()[-1:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # to torchrun's agent, which forwards it
        out, err = proc.communicate(timeout=limit / 2)
        match = STOPPED.search(out)
        if not match:
            raise RuntimeError(f"no stop line after SIGTERM (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
        step = int(match.group(1))
        _run([*_torchrun(1), "train", DEMO, *sets, "--set", f"train.steps={step + 3}", "--resume"],
             limit - (time.monotonic() - start))
        if not (Path(tmp) / "final.pt").is_file():
            raise RuntimeError("the resumed run wrote no final.pt")
    return f"SIGTERM stopped at step {step} with a checkpoint; resumed to step {step + 3}"


def numbers(what: str, limit: float) -> str:
    out = _run([PY, "tools/gpu_numbers.py", what], limit).stdout.strip().splitlines()
    return out[-1] if out else ""


def nproc_all(limit: float) -> str:
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"{n} GPU visible: --nproc N needs N > 1")
    done = _run([PY, "-m", "disttrain", "verify", DEMO, "--nproc", str(n), "--set", "train.device=cuda",
                 "--set", "train.steps=8", "--set", "train.out_dir=runs/gpu_check_nproc"], limit)
    return done.stdout.strip().splitlines()[-1]


def gpu_tests(limit: float) -> str:
    done = _run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], limit)
    return done.stdout.strip().splitlines()[-1]


def suite(limit: float) -> str:
    done = _run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "tests"], limit)
    return done.stdout.strip().splitlines()[-1]


def sync_count(limit: float) -> str:
    # disttrain bench syncs on one GPU: host reads per training step (at most one: the norm, fp16's overflow flag and
    # the stop request read back together), and torch's own sync reports (set_sync_debug_mode("warn")) per step.
    done = _run([PY, "-m", "disttrain", "bench", "syncs", "--device", "cuda", "--json"], limit)
    result = json.loads(done.stdout)
    reads, syncs = result["max_reads_per_step"], result["max_cuda_syncs_per_step"]
    if reads > 1:
        raise AssertionError(f"{reads} host reads in one step (at most 1)")
    return f"at most {reads} host read and {syncs} CUDA syncs per step over {len(result['rows'])} settings"


def checks(full_suite: bool) -> list[tuple[str, float, Callable[[float], str]]]:
    table = [("device", 30, lambda limit: device()),
             *[(f"nccl group of one: {impl}, SyncBN, stop on SIGTERM, resume", 60,
                lambda limit, impl=impl: nccl_group_of_one(impl, limit)) for impl in ("ddp", "allreduce", "fsdp")],
             ("SyncBN on CUDA in an NCCL group of one vs torch's and float64", 45,
              lambda limit: numbers("syncbn", limit)),
             ("trainer on cuda: fp32 (TF32 off), bf16, fp16 vs CPU float64", 75,
              lambda limit: numbers("trainer", limit)),
             ("--nproc N = visible GPUs: verify", 60, nproc_all),
             ("GPU-marked tests", 60, gpu_tests),
             ("sync count", 30, sync_count)]
    return table + ([("whole test suite", 600, suite)] if full_suite else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    parser.add_argument("--suite", action="store_true", help="also run the whole test suite")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    results = []
    for name, limit, check in checks(args.suite):
        start = time.monotonic()
        try:
            status, detail = "ok", check(limit)
        except Skip as exc:
            status, detail = "skipped", str(exc)
        except subprocess.TimeoutExpired:
            status, detail = "FAILED", f"over its limit of {limit:g} s"
        except Exception as exc:  # one line per check, whatever went wrong
            status, detail = "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0]
        seconds = time.monotonic() - start
        results.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"gpu_check: {status:<7} {name} ({seconds:.0f} s): {detail}", flush=True)
    failed = [r for r in results if r["status"] == "FAILED"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "FAILED")}
    total = sum(r["seconds"] for r in results)
    print(f"gpu_check: {'FAILED' if failed else 'done'}: {counts['ok']} ok, {counts['skipped']} skipped, "
          f"{counts['FAILED']} failed in {total:.0f} s; results in {args.json}")
    Path(args.json).write_text(json.dumps({"results": results, "seconds": round(total, 1)}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

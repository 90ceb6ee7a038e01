"""Sharded checkpoints (train.checkpoint_format: sharded, torch's DCP): every rank writes what it holds, a run resumes
from them on any number of ranks exactly as from a full checkpoint, a background save writes the state of its step,
a killed save is never resumed, and export/info read them with no process group.

Same world size: bitwise (as tests/test_resume.py). Another world size: within 1e-10 of the uninterrupted run.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from disttrain.checkpoint.files import atomic_save
from disttrain.checkpoint.format import list_checkpoints, load_checkpoint, newest_readable
from disttrain.checkpoint.layout import MARKER, sharded_path
from disttrain.checkpoint.resume import resume_state
from disttrain.checkpoint.sharded import bytes_per_rank, read_manifest, write_sharded
from disttrain.cli.main import main as cli_main
from disttrain.config import config_from_dict, load_config
from disttrain.config.validate import checkpoint_format
from disttrain.errors import ConfigError
from disttrain.parallel.env import DistEnv
from tests.common import max_rel_diff
from tests.test_resume import RESIZE, _assert_bitwise, _cfg, _segment, train_segment
from tests.test_stop import _storage_error, small_disk  # noqa: F401 (a fixture)

SHARDED = [*RESIZE, "train.checkpoint_format=sharded", "train.steps=9"]


def _final(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])


# --------------------------------------------------------------------------- resume: same W bitwise, across W 1e-10

@pytest.mark.parametrize("impl, other", [("fsdp", 3), ("ddp", 1)])
def test_sharded_resume_is_bitwise_at_the_same_world_size_and_reshards(pools, tmp_path, impl, other):
    overrides = [*SHARDED, f"comm.impl={impl}"]
    whole = _cfg(overrides, tmp_path / "whole")
    _segment(pools, 2, whole, False, None)
    parts = _cfg(overrides, tmp_path / "parts")
    _segment(pools, 2, parts, False, 6)
    assert [p.name for _, p in list_checkpoints(tmp_path / "parts")] == ["step_00000003", "step_00000006"]
    shutil.copytree(tmp_path / "parts", tmp_path / "resized")
    files = sorted(p.name for p in sharded_path(tmp_path / "parts", 6).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", MARKER]  # each rank wrote its own file

    _segment(pools, 2, parts, True, None)
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "parts")
    assert a["step"] == b["step"] == 9
    _assert_bitwise(a, b)
    final = torch.load(tmp_path / "parts" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], a["model"][k]) for k in final)

    resized = _cfg(overrides, tmp_path / "resized")
    _segment(pools, other, resized, True, None)
    c = _final(tmp_path / "resized")
    assert c["world_size"] == other and max_rel_diff(c["model"], a["model"]) <= 1e-10
    # The run moved after the checkpoint: the comparisons above are not vacuous.
    assert max_rel_diff(load_checkpoint(sharded_path(tmp_path / "parts", 6))["model"], a["model"]) > 1e-3


def test_ddp_writes_the_replicated_state_once_split_over_the_ranks(pools, tmp_path):
    cfg = _cfg([*SHARDED, "comm.impl=ddp", "model.hidden=64"], tmp_path)
    _segment(pools, 2, cfg, False, 3)
    manifest = read_manifest(sharded_path(tmp_path, 3))
    per_rank = bytes_per_rank(manifest)
    whole = load_checkpoint(sharded_path(tmp_path, 3))
    tensor_bytes = sum(v.numel() * v.element_size() for v in whole["model"].values()) + sum(
        v.numel() * v.element_size() for s in whole["optimizer"]["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor))
    assert set(per_rank) == {0, 1} and min(per_rank.values()) > 0.2 * tensor_bytes  # both ranks wrote a share
    # Once, not once per rank (plus torch.save's headers, about 1 KB per tensor).
    assert sum(per_rank.values()) < 1.2 * tensor_bytes


# --------------------------------------------------------------------------- background saves write their own step

def _slow_writes(cfg_dict: dict, resume: object, until: int | None, delay: float, copy: bool) -> list:
    """train_segment with every DCP file write delayed by ``delay`` s (``copy``: False replaces the staging copy by
    the live tensors, the situation of pytorch #144657); the step end times and the write intervals."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    from disttrain.checkpoint import writer
    from disttrain.parallel.env import distributed
    from disttrain.run.train import Hook, run

    original, staged_copy = _FileSystemWriter.write_data, writer.staged_copy
    events: list = []

    def write_data(self, plan, planner):
        start = time.monotonic()
        time.sleep(delay)
        out = original(self, plan, planner)
        events.append(("write", start, time.monotonic()))
        return out

    class Steps(Hook):
        def on_step_end(self, trainer, step, result):
            events.append(("step", step, time.monotonic()))

    _FileSystemWriter.write_data = write_data
    if not copy:
        writer.staged_copy = lambda state: state
    try:
        with distributed("cpu", 30.0) as env:
            run(config_from_dict(cfg_dict), env, console=False, resume=resume, stop_at=until, hooks=(Steps(),))
    finally:
        _FileSystemWriter.write_data, writer.staged_copy = original, staged_copy
    return events


def test_an_async_save_writes_its_step_while_training_goes_on(pools, tmp_path):
    overrides = [*SHARDED, "comm.impl=fsdp", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    sync = _cfg(overrides, tmp_path / "sync", "train.checkpoint_async=false")
    _segment(pools, 2, sync, False, None)
    background = _cfg(overrides, tmp_path / "async")
    events = pools(2).run(_slow_writes, background, False, 6, 0.4, True)[0]
    # Steps 3 and 4 ran while step 2's checkpoint was being written: the loop did not wait for the disk.
    write = next(e for e in events if e[0] == "write")
    assert any(e[0] == "step" and e[1] >= 2 and write[1] < e[2] < write[2] for e in events), events
    for step in (2, 4, 6):
        _assert_bitwise(load_checkpoint(sharded_path(tmp_path / "sync", step)),
                        load_checkpoint(sharded_path(tmp_path / "async", step)))
    # Resumed from step 2 (trained past while it was written), the run ends bitwise where the uninterrupted one does.
    pools(2).run(_slow_writes, background, sharded_path(tmp_path / "async", 2), None, 0.0, True)
    _assert_bitwise(_final(tmp_path / "sync"), _final(tmp_path / "async"))

    # Without the copy the same save writes what later steps made of the live tensors: the check above can fail.
    uncopied = _cfg([*overrides, "comm.impl=ddp"], tmp_path / "uncopied")
    pools(2).run(_slow_writes, uncopied, False, 4, 0.4, False)
    sync_ddp = _cfg([*overrides, "comm.impl=ddp"], tmp_path / "sync_ddp", "train.checkpoint_async=false")
    _segment(pools, 2, sync_ddp, False, 4)
    a, b = load_checkpoint(sharded_path(tmp_path / "sync_ddp", 2)), load_checkpoint(sharded_path(tmp_path / "uncopied", 2))
    assert max_rel_diff(a["model"], b["model"]) > 1e-6


def _leftovers_then_save(directory: str, delay: float) -> list:
    """Every rank saves step 1 into ``directory``, which holds a half-written save of that step; rank 0 arrives
    ``delay`` s late (as when it builds the marker's contents). The times of rank 0's removal of the leftovers and of
    every rank's creation of the directory (DCP's FileSystemWriter, while it plans)."""
    from torch.distributed.checkpoint import filesystem

    from disttrain.checkpoint import sharded
    from disttrain.parallel.env import distributed

    events: list = []
    mkdir, remove = filesystem.FileSystem.mkdir, sharded.remove_checkpoint

    def timed_mkdir(self, path):
        events.append(("mkdir", time.monotonic()))
        return mkdir(self, path)

    def timed_remove(path):
        remove(path)
        events.append(("removed", time.monotonic()))

    filesystem.FileSystem.mkdir, sharded.remove_checkpoint = timed_mkdir, timed_remove
    try:
        with distributed("cpu", 30.0) as env:
            manifest = None
            if env.rank == 0:
                time.sleep(delay)
                manifest = {"step": 1, "scheduler": {}, "skipped": 0, "config": {}, "world_size": env.world_size}
            state = {"model": {"w": torch.arange(8, dtype=torch.float64)}, "optimizer": {"param_groups": []}}
            write_sharded(sharded_path(directory, 1), state, manifest, Path(directory), keep=0)
    finally:
        filesystem.FileSystem.mkdir, sharded.remove_checkpoint = mkdir, remove
    return events


def test_no_rank_creates_the_directory_before_rank_0_removed_the_leftovers(pools, tmp_path):
    # A rank ahead of rank 0 used to create the step's directory, which rank 0 then took for leftovers and removed
    # under it: "File exists (errno 17)" from that rank's mkdir, in a demo run.
    leftover = sharded_path(tmp_path, 1)
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half")
    events = pools(2).run(_leftovers_then_save, str(tmp_path), 0.5)
    removed = next(t for name, t in events[0] if name == "removed")
    mkdirs = [t for rank_events in events for name, t in rank_events if name == "mkdir"]
    assert mkdirs and all(t > removed for t in mkdirs), events
    manifest = read_manifest(leftover)
    assert manifest["step"] == 1 and (leftover / "__0_0.distcp").stat().st_size != 4


# --------------------------------------------------------------------------- kill -9 during a save

def _save_forever(directory: str) -> None:  # a forked child, no process group: save sharded checkpoints until killed
    state = {"model": {"w": torch.randn(1_000_000, dtype=torch.float64)}, "optimizer": {"param_groups": []}}
    step = 0
    while True:
        step += 1
        manifest = {"step": step, "scheduler": {}, "skipped": 0, "config": {}, "world_size": 1}
        write_sharded(sharded_path(directory, step), state, manifest, Path(directory), keep=2)


def test_kill_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    torn = 0
    for attempt in range(5):
        child = ctx.Process(target=_save_forever, args=(str(tmp_path),))
        child.start()
        time.sleep(0.3 + rng.random() * 0.4)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        found = list_checkpoints(tmp_path)
        assert found, "the writer never finished a checkpoint"
        for _, path in found:  # every listed directory is complete: its marker and every file it names
            read_manifest(path)
        torn += any(p.is_dir() and not (p / MARKER).exists() for p in (tmp_path / "checkpoints").iterdir())
        assert newest_readable(tmp_path, warn=pytest.fail)["step"] == found[-1][0]
    assert torn  # some kill did land mid-save (an unmarked directory), and it was never listed


# --------------------------------------------------------------------------- bad input, one line each

@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """One process, sharded, checkpoints at steps 2 and 4 (a run with no process group: DCP's single-process
    save)."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    train_segment(_cfg([*SHARDED, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"], run_dir),
                  False, None)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def _resume_error(cfg: dict, resume: object) -> str:
    with pytest.raises(ConfigError) as info:
        resume_state(config_from_dict(cfg), DistEnv(0, 0, 1, torch.device("cpu"), None), resume)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_sharded_checkpoints_are_one_line(small_run, tmp_path, capsys):
    run_dir = _copy(small_run, tmp_path)
    cfg = _cfg([*SHARDED, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"], run_dir)
    step4, step2 = sharded_path(run_dir, 4), sharded_path(run_dir, 2)
    # An incomplete (unmarked) directory, named explicitly.
    (step4 / MARKER).rename(tmp_path / "marker")
    assert _resume_error(cfg, step4) == (f"{step4}: incomplete sharded checkpoint (no {MARKER}: its save never "
                                         "finished)")
    assert cli_main(["checkpoint", "export", str(run_dir), "--step", "4", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"disttrain: error: {step4}: incomplete sharded checkpoint (no " \
                                              f"{MARKER}: its save never finished)"
    assert newest_readable(run_dir, warn=pytest.fail)["step"] == 2  # never taken for a checkpoint
    (tmp_path / "marker").rename(step4 / MARKER)
    # A checkpoint written by a newer disttrain.
    manifest = torch.load(step4 / MARKER, weights_only=True)
    atomic_save({**manifest, "format": 2}, step4 / MARKER)
    assert _resume_error(cfg, step4) == (f"{step4}: sharded checkpoint format 2, this disttrain reads 1 (written by "
                                         "a newer disttrain)")
    lines: list[str] = []
    assert newest_readable(run_dir, warn=lines.append)["step"] == 2 and len(lines) == 1 and str(step4) in lines[0]
    # A rank's shard missing.
    (step2 / "__0_0.distcp").unlink()
    assert _resume_error(cfg, step2) == (f"{step2}: __0_0.distcp is missing (rank 0's shard); the checkpoint is "
                                         "incomplete")
    # A checkpoint of another model shape whose config says the same (a user's model code changed): one line,
    # before any tensor is read.
    other = _copy(small_run, tmp_path / "other")
    wider = _cfg([*SHARDED, "train.steps=4", "train.checkpoint_every=2", "model.hidden=12"], other)
    shutil.rmtree(sharded_path(other, 4))
    manifest = torch.load(sharded_path(other, 2) / MARKER, weights_only=True)
    atomic_save({**manifest, "config": wider}, sharded_path(other, 2) / MARKER)
    (tmp_path / "wider.yaml").write_text(config_from_dict(wider).to_yaml())
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "wider.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"disttrain: error: {sharded_path(other, 2)}: checkpoint model state: features.0.weight has shape "
                   "(4, 3, 3, 3), the model's is (6, 3, 3, 3)"), err


@pytest.mark.parametrize("background", ["true", "false"])
def test_a_full_disk_is_one_line_and_the_newest_sharded_checkpoint_stays(capsys, tmp_path, small_disk, background):
    err = _storage_error(capsys, tmp_path, small_disk / "run", "train.checkpoint_every=2", "train.keep_checkpoints=0",
                         "train.steps=60", "train.checkpoint_format=sharded", f"train.checkpoint_async={background}")
    assert re.search(r"cannot write \S+/checkpoints/step_\d{8}\S*: No space left on device \(errno 28\); newest "
                     r"complete checkpoint: \S+/step_\d{8}$", err), err
    newest = Path(err.rsplit(" ", 1)[1])
    assert load_checkpoint(newest)["step"] == int(newest.name[5:]) > 0


# --------------------------------------------------------------------------- export and info, no process group

def test_export_and_info_read_a_sharded_run_in_one_process(pools, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _segment(pools, 2, _cfg([*SHARDED, "comm.impl=fsdp", "train.keep_checkpoints=0"], run_dir), False, None)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    capsys.readouterr()
    assert cli_main(["checkpoint", "export", str(run_dir), str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert exported.keys() == final.keys() and exported["step"] == 9 and exported["world_size"] == 2
    assert all(torch.equal(exported["model"][k], final["model"][k]) for k in final["model"])
    from safetensors.torch import load_file

    assert cli_main(["checkpoint", "export", str(run_dir), "--step", "3", str(tmp_path / "model.safetensors")]) == 0
    step3 = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(step3[k], load_checkpoint(sharded_path(run_dir, 3))["model"][k]) for k in step3)
    capsys.readouterr()
    assert cli_main(["checkpoint", "info", str(run_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:3] for line in lines[1:]] == [[str(s), "sharded", "2"] for s in (3, 6, 9)]
    per_rank = bytes_per_rank(read_manifest(sharded_path(run_dir, 9)))
    assert lines[-1].split()[3:5] == [str(per_rank[0]), str(per_rank[1])]


# --------------------------------------------------------------------------- config, and the data position

def test_the_format_follows_the_strategy_unless_set():
    assert checkpoint_format(load_config(None, [])) == "full"
    assert checkpoint_format(load_config(None, ["comm.impl=fsdp"])) == "sharded"
    assert checkpoint_format(load_config(None, ["comm.impl=fsdp", "train.checkpoint_format=full"])) == "full"
    assert checkpoint_format(load_config(None, ["train.checkpoint_format=sharded"])) == "sharded"
    with pytest.raises(ConfigError, match="^train.checkpoint_format: "):
        load_config(None, ["train.checkpoint_format=zarr"])


@pytest.mark.parametrize("world_size, workers", [(3, 0), (2, 1)])
def test_the_data_position_is_the_step_at_any_world_size(world_size, workers):
    """What a resumed rank reads from step s on is a function of (seed, s): the ranks' slices of step s, at any W and
    loader worker count, are exactly the one-device global batch of step s, with the same per-sample keys."""
    from disttrain.data.loader import GlobalBatches
    from disttrain.run.build import build_data

    source = build_data(load_config(None, ["data.num_samples=56", "model.name=cnn"]))
    start, stop, cpu = 5, 7, torch.device("cpu")
    one = dict(GlobalBatches(source, 14, 0, 0, 1).steps(start, stop, cpu, 1))
    ranks = [GlobalBatches(source, 14, 0, r, world_size, workers=workers) for r in range(world_size)]
    try:
        read = [dict(batches.steps(start, stop, cpu, 1)) for batches in ranks]
    finally:
        for batches in ranks:
            batches.close()
    for step in range(start, stop):
        (x, y, keys), = one[step]
        parts = [r[step][0] for r in read]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[2].positions for p in parts]), keys.positions)
        assert all(p[2].step == step and p[2].seed == keys.seed for p in parts)

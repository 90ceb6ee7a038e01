"""Data on disk (arrays, image folders) and map-style datasets, read per step and per rank, with loader workers:
the same trajectory for any world size and worker count, resume at any step, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.run.build import build_data
from disttrain.cli.main import main
from disttrain.config import DataConfig
from disttrain.config import load_config
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches
from disttrain.data.arrays import ArraySource
from disttrain.parallel.env import distributed
from disttrain.run.tasks import launch_local
from disttrain.run.train import run
from tests.common import max_rel_diff

ROOT = Path(__file__).resolve().parent.parent
F = "tests.factories"


def write_images(root: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> Path:
    """An image folder: root/CLASS/NNN.png, one random RGB image of (W, H) per entry."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def write_arrays(root: Path, n: int, x_dtype=np.uint8, y=None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, (n, 3, 6, 6)).astype(x_dtype)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", rng.integers(0, 4, n) if y is None else y)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits exported as an image folder by the command the README shows."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["data", "export", "digits", str(out)]) == 0
    return out


# --------------------------------------------------------------------------- formats

def test_export_digits_writes_every_sample_in_class_folders(digits):
    folders = sorted(p.name for p in digits.iterdir())
    assert folders == [str(d) for d in range(10)]
    assert sum(len(list((digits / d).glob("*.png"))) for d in folders) == 1797
    source = build_dataset(DataConfig(name="imagefolder", path=str(digits), num_samples=0), "cnn", 0, torch.float64)
    assert len(source) == 1797 and source.input_shape == (3, 8, 8) and source.num_classes == 10
    from sklearn.datasets import load_digits

    ref = load_digits()
    x, y = source.fetch(np.array([0, 1796]))
    # The first file of class 0 is sample 0; pixels 0..16 -> 0..255 grey -> [0, 1] in three equal channels.
    assert int(y[0]) == 0 and torch.equal(x[0, 0], x[0, 2])
    assert torch.allclose(x[0, 0], torch.as_tensor((ref.images[0] * 255 // 16) / 255), atol=1e-12)


def test_imagefolder_labels_resize_and_normalisation(tmp_path):
    root = write_images(tmp_path / "imgs", {"b_cat": [(5, 4), (5, 4)], "a_dog": [(5, 4)]})
    cfg = DataConfig(name="imagefolder", path=str(root), num_samples=0)
    plain = build_dataset(cfg, "cnn", 0, torch.float32)
    assert plain.input_shape == (3, 4, 5) and plain.num_classes == 2
    x, y = plain.fetch(np.array([2, 0, 1]))
    assert y.tolist() == [1, 0, 1]  # labels follow the sorted class names: a_dog 0, b_cat 1
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    resized = build_dataset(DataConfig(name="imagefolder", path=str(root), num_samples=0, image_size=[7, 3],
                                       mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), "cnn", 0, torch.float64)
    xr, _ = resized.fetch(np.array([0]))
    assert xr.shape == (1, 3, 7, 3) and float(xr.min()) >= -2 and float(xr.max()) <= 2
    subset = build_dataset(DataConfig(name="imagefolder", path=str(root), num_samples=2), "cnn", 0, torch.float32)
    assert len(subset) == 2


def test_arrays_read_exactly_the_rows_of_a_batch(tmp_path):
    """Nothing read until a batch needs it; then exactly its rows' bytes (pread: no read-ahead, nothing mapped)."""
    root = write_arrays(tmp_path / "arr", 50)
    source = build_dataset(DataConfig(name="arrays", path=str(root), num_samples=0), "cnn", 0, torch.float64)
    assert isinstance(source, ArraySource) and source.bytes_read == 0
    x, y = source.fetch(np.array([7, 3, 7]))
    raw_x, raw_y = np.load(root / "x.npy"), np.load(root / "y.npy")
    assert source.bytes_read == 3 * (raw_x[0].nbytes + raw_y[0].nbytes)
    assert torch.equal(x, torch.as_tensor(raw_x[[7, 3, 7]], dtype=torch.float64) / 255)  # uint8 -> [0, 1]
    assert y.tolist() == raw_y[[7, 3, 7]].tolist() and source.num_classes == int(raw_y.max()) + 1
    seeded = [build_dataset(DataConfig(name="arrays", path=str(root), num_samples=20), "cnn", s, torch.float64)
              for s in (0, 0, 1)]
    assert len(seeded[0]) == 20 and np.array_equal(seeded[0].rows, seeded[1].rows)
    assert not np.array_equal(seeded[0].rows, seeded[2].rows)


def _reads_per_rank(cfg_dict: dict) -> tuple[int, list[int]]:
    from tests.factories import CountingDataset

    cfg = load_config(None, [f"{k}={v}" for k, v in cfg_dict.items()])
    with distributed("cpu") as env:
        run(cfg, env, console=False)
        return env.rank, sorted(CountingDataset.reads)


def test_each_rank_reads_only_its_slice_of_a_map_style_dataset(pools, tmp_path):
    cfg = {"data.name": f"{F}:counting_images", "data.num_samples": 40, "data.num_classes": 3, "model.name": "cnn",
           "train.global_batch_size": 10, "train.steps": 3, "train.device": "cpu", "train.checkpoint_every": 0,
           "train.out_dir": str(tmp_path)}
    reads = dict(pools(2).run(_reads_per_rank, cfg))
    batches = [GlobalBatches(build_data(load_config(None, [f"{k}={v}" for k, v in cfg.items()])), 10, 0, r, 2)
               for r in range(2)]
    for rank in range(2):  # the shape check reads item 0 once; then exactly this rank's samples of each step
        expected = sorted([0] + [int(i) for s in range(3) for i in batches[rank].indices(s)])
        assert reads[rank] == expected


# --------------------------------------------------------------------------- the same trajectory

SMALL_IMAGES = ["train.steps=6", "train.global_batch_size=31", "data.num_samples=300", "train.dtype=float64",
                "train.device=cpu", "model.kwargs={width: 4, blocks: [1]}", "train.log_every=100"]


def _cfg(digits: Path, out: Path, *extra: str):
    return load_config(ROOT / "configs" / "imagefolder.yaml",
                       [f"data.path={digits}", f"train.out_dir={out}", *SMALL_IMAGES, *extra])


def _final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)["model"]


def test_imagefolder_with_workers_at_w3_equals_one_process_without(digits, tmp_path, capsys):
    """W=3 (31 = 11 + 10 + 10) with 2 loader workers per rank and flip_crop ends where one process reading in
    its own process does; verify --against says so across the worker counts."""
    launch_local(_cfg(digits, tmp_path / "w3", "data.workers=2"), 3, console=False)
    with distributed("cpu") as env:
        run(_cfg(digits, tmp_path / "w1", "data.workers=0"), env, console=False)
    assert max_rel_diff(_final(tmp_path / "w3"), _final(tmp_path / "w1")) <= 1e-10
    code = main(["verify", str(ROOT / "configs" / "imagefolder.yaml"), "--against", str(tmp_path / "w3"), "--json",
                 *[a for o in [f"data.path={digits}", f"train.out_dir={tmp_path / 'v'}", *SMALL_IMAGES,
                               "data.workers=0"] for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert code == 0 and '"equivalent": true' in out


def test_resume_mid_epoch_with_another_worker_count_is_bitwise(digits, tmp_path):
    """300 samples, 31 per step: step 14 is inside the second epoch. Stopped there with 2 workers and resumed
    in-process without workers, the run is bitwise the uninterrupted one."""
    steps = ["train.steps=16", "train.checkpoint_every=7"]
    with distributed("cpu") as env:
        run(_cfg(digits, tmp_path / "whole", "data.workers=0", *steps), env, console=False)
        run(_cfg(digits, tmp_path / "split", "data.workers=2", *steps), env, console=False, stop_at=14)
        result = run(_cfg(digits, tmp_path / "split", "data.workers=0", *steps), env, console=False, resume=True)
    assert result.start_step == 14
    whole, split = _final(tmp_path / "whole"), _final(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_keyed_transform_of_a_users_dataset_is_the_same_on_any_rank(pools, tmp_path):
    """A dataset's own random flip, drawn from the samples' keys: W=3 equals one process."""
    overrides = [f"data.name={F}:keyed_flip_images", "data.num_samples=40", "data.num_classes=3", "model.name=cnn",
                 "train.global_batch_size=10", "train.steps=4", "train.dtype=float64", "train.device=cpu",
                 "train.checkpoint_every=0"]
    from tests.common import reference, train_on_rank

    ref_state, _ = reference(tuple([*overrides, f"train.out_dir={tmp_path / 'ref'}"]))
    state, _ = pools(3).run(train_on_rank, load_config(None, [*overrides, f"train.out_dir={tmp_path / 'd'}"]
                                                       ).to_dict())[0]
    assert max_rel_diff(state, ref_state) <= 1e-10
    x_plain = build_data(load_config(None, overrides)).fetch(np.arange(40))[0]
    from disttrain.randomness import SampleKeys

    x_keyed = build_data(load_config(None, overrides)).fetch(np.arange(40), SampleKeys(0, 0, torch.arange(40)))[0]
    assert not torch.equal(x_plain, x_keyed)  # the transform does act


# --------------------------------------------------------------------------- bad input

def _bad_images(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = write_images(tmp_path / "no_images", {"a": [(4, 4)]})
    (no_images / "b").mkdir()
    (no_images / "b" / "notes.txt").write_text("not an image")
    mixed = write_images(tmp_path / "mixed", {"a": [(4, 4)], "b": [(5, 4)]})
    return {"empty": empty, "no_images": no_images, "mixed": mixed}


BAD = [
    (["data.name=imagefolder"], r"data\.path: data\.name=imagefolder reads a directory; set data\.path"),
    (["data.name=arrays", "data.path=/nonexistent/dir"], r"data\.path: /nonexistent/dir does not exist"),
    (["data.name=imagefolder", "data.path={empty}"], r"data\.path: .*empty has no class folders"),
    (["data.name=imagefolder", "data.path={no_images}"], r"class folder .*no_images/b has no \.png, \.jpg or \.jpeg"),
    (["data.name=arrays", "data.path={short}"], r"data\.path: x\.npy has 20 samples but y\.npy has 19"),
    (["data.name=arrays", "data.path={float_y}"], r"y\.npy has dtype float64 and shape \(20,\); "
                                                  r"train\.loss=cross_entropy needs integer class labels"),
    (["data.workers=-1"], r"data\.workers: must be >= 0, got -1"),
    (["data.prefetch=0"], r"data\.prefetch: must be >= 1, got 0"),
    (["data.path=/tmp"], r"data\.path: only for imagefolder, arrays, tokens, not data\.name=synthetic"),
    (["data.name=imagefolder", "data.path={mixed}", "data.image_size=[4]"], r"data\.image_size: must be \[H, W\]"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_data_is_one_line_exit_2(capsys, tmp_path, overrides, message, request):
    if overrides is not BAD[1][0]:  # the first error the ranks find through launched workers, the others on the pools
        request.getfixturevalue("pooled_launches")
    paths = {**_bad_images(tmp_path), "short": write_arrays(tmp_path / "short", 20, y=np.zeros(19, dtype=np.int64)),
             "float_y": write_arrays(tmp_path / "float_y", 20, y=np.zeros(20))}
    argv = ["train", str(ROOT / "configs" / "demo.yaml"), "--nproc", "2", "--set", f"train.out_dir={tmp_path / 'o'}",
            "--set", "model.name=cnn", "--set", "train.global_batch_size=2", "--set", "data.num_samples=null"]
    for o in overrides:
        argv += ["--set", o.format(**paths)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err.strip()), err


def test_unreadable_images_stop_every_rank_with_the_file_named(tmp_path, capsys):
    """A corrupt image, and one of another size, found while training by one rank: one line naming the file,
    exit 1, and the other rank does not wait in a collective for the timeout."""
    for kind in ("corrupt", "mixed"):
        root = write_images(tmp_path / kind, {"a": [(4, 4)] * 6, "b": [(4, 4)] * 6})
        bad = root / "b" / "003.png"
        if kind == "corrupt":
            bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        else:
            write_images(tmp_path / "other", {"b": [(5, 4)]})
            (tmp_path / "other" / "b" / "000.png").replace(bad)
        argv = ["train", str(ROOT / "configs" / "demo.yaml"), "--nproc", "2"]
        for o in ["data.name=imagefolder", f"data.path={root}", "data.num_samples=0", "model.name=cnn",
                  "model.norm=none", "train.global_batch_size=4", "train.steps=6", "train.checkpoint_every=0",
                  f"train.out_dir={tmp_path / (kind + '_out')}", "comm.timeout_s=60", "data.workers=1"]:
            argv += ["--set", o]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err, err
        assert ("cannot decode" if kind == "corrupt" else "is 5x4 but") in err
        # torch's agent logged the failure with its traceback in the run directory, not on the console
        log = tmp_path / f"{kind}_out" / "launcher.log"
        assert f"(full log: {log})" in err and "Traceback" in log.read_text()


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_loader_workers_of_a_spawned_rank_do_not_copy_a_memmap_dataset(tmp_path):
    """Ranks are spawned (--nproc), and a DataLoader inherits its process's start method: under spawn a user's
    dataset is pickled into each worker, and a numpy memmap pickles as its whole file. Here the process's
    default is spawn, as in a rank, and the dataset maps a 200 MB file (sparse: free to write): reading steps
    with a worker raises this process's peak RSS by far less than the file."""
    path = tmp_path / "x.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(200_000, 1000)).flush()
    cfg = DataConfig(name=f"{F}:memmap_rows", num_samples=200_000, num_classes=3, kwargs={"path": str(path)})
    source = build_dataset(cfg, "mlp", 0, torch.float64)
    batches = GlobalBatches(source, 8, seed=0, rank=0, world_size=1, workers=1)
    import multiprocessing
    default = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _peak_rss_mb()
        steps = [(x, y) for _, [(x, y, _)] in batches.steps(0, 3, torch.device("cpu"), 1)]
        grew = _peak_rss_mb() - before
    finally:
        batches.close()
        multiprocessing.set_start_method(default, force=True)
    for step, (x, y) in enumerate(steps):
        assert torch.equal(x, source.fetch(batches.indices(step))[0]) and x.shape == (8, 1000)
    assert grew < 50, f"peak RSS grew {grew:.0f} MB while a worker read 3 steps of a 200 MB memmap dataset"

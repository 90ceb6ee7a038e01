"""`disttrain demo` and `disttrain plot`: every claim from the demos' own JSON, the report, the plots, user errors.

One `disttrain demo all --quick` in this process (the real trainer, real worker groups from the session's pools,
small settings) feeds the tests that read its outputs; the error paths run in-process and start no workers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from disttrain.cli.main import main
from tests.harness import pooled_launch

ROOT = Path(__file__).resolve().parents[1]
EQUAL, DIFFERENT = 1e-10, 1e-3
NAMES = ["reduce", "syncbn", "warmup", "clip", "precision", "scaling", "kmeans", "parallelism", "tokens", "check"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


@pytest.fixture(scope="module")
def demos(tmp_path_factory, pools):
    """`disttrain demo all --quick --json`, run by the command's own entry point in this process, its W ranks on
    the session's pools (the demos' worker groups otherwise start W fresh interpreters); the check demo's scripts
    are launched as they always are."""
    from disttrain.demos import common

    out = tmp_path_factory.mktemp("demos")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(common, "launch_local_tasks", pooled_launch(pools))
        code = main(["demo", "all", "--quick", "--json", "--out", str(out)])
    assert code == 0, stdout.getvalue()[-2000:] + stderr.getvalue()[-4000:]
    return json.loads(stdout.getvalue()), out, stderr.getvalue()


@pytest.mark.timeout(450)
def test_demo_all_writes_summary_results_and_plots(demos):
    summary, out, stderr = demos
    assert list(summary) == NAMES
    assert json.loads((out / "summary.json").read_text()) == summary  # --json prints summary.json
    for name, entry in summary.items():
        assert isinstance(entry["claim"], str) and entry["holds"] is True, (name, entry["conclusion"])
        assert entry["checks"] and all(c["holds"] for c in entry["checks"])
        assert json.loads((out / name / "result.json").read_text()) == entry
        for plot in entry["plots"]:
            width, height = png_size(out / name / plot)
            assert width >= 1000 and height >= 400
    assert f"{len(NAMES)}/{len(NAMES)} claims hold" in stderr


def test_check_finds_each_script_and_names_its_cause(demos):
    check = demos[0]["check"]
    assert check["correct"]["verdict"] == "EQUIVALENT" and max(check["correct"]["distance"]) <= EQUAL
    assert check["per-rank token mean"]["verdict"] == "NOT EQUIVALENT"
    assert any("non-uniform" in h for h in check["per-rank token mean"]["hints"])
    assert any("BatchNorm not synchronised" in h for h in check["BatchNorm per rank"]["hints"])
    assert check["BatchNorm per rank"]["first_beyond"] == 1


def test_tokens_only_the_global_token_mean_equals_one_device(demos):
    dev = demos[0]["tokens"]["deviation"]
    assert dev["tokens"] <= EQUAL and dev["sequence_mean_own_objective"] <= EQUAL
    assert min(dev["avg"], dev["micro_batch_mean"], dev["sequence_mean"]) >= DIFFERENT


def test_reduce_only_the_count_weighted_mean_equals_one_device(demos):
    entry = demos[0]["reduce"]
    dev = entry["deviation"]
    assert entry["global_batch_size"] % entry["world_size"] != 0  # an uneven split
    assert dev["mean"] <= EQUAL and dev["avg_even"] <= EQUAL  # DDP's plain average is exact on even slices only
    assert dev["avg"] >= DIFFERENT and dev["sum"] >= DIFFERENT and dev["max"] >= DIFFERENT


def test_syncbn_equals_one_device_and_needs_one_exchange_each_way(demos):
    entry = demos[0]["syncbn"]
    assert all(v <= EQUAL for v in entry["deviation"]["syncbn"].values())
    assert all(v >= DIFFERENT for v in entry["deviation"]["bn"].values())
    bn, one = entry["eval"]["bn"], entry["eval"]["one"]
    assert bn["2"]["loss"] - one["2"]["loss"] > bn["16"]["loss"] - one["16"]["loss"]  # worst at 2 per rank
    calls = {name: (c["forward"], c["backward"]) for name, c in entry["collectives"].items()}
    assert calls["disttrain"] == (1, 1) and calls["two-pass"] == (2, 2) and calls["local"] == (0, 0)
    errors = entry["variance_relative_error"]
    # labelled with the backend the demo ran on (gloo: the CPU), never a backend it did not use
    assert errors["disttrain (all_gather on gloo, its default)"] <= 1e-5 and errors["naive E[x^2]-E[x]^2"] >= 1e-1
    assert "disttrain (all_reduce on gloo)" in errors and not any("NCCL" in k for k in errors)


def test_warmup_trains_better_than_no_warmup(demos):
    entry = demos[0]["warmup"]
    med = entry["median_final_loss"]
    assert med["none"] >= 3 * med["warmup"] and entry["warmup_wins"] > entry["seeds"] / 2


def test_clip_after_averaging_equals_one_device_before_does_not(demos):
    entry = demos[0]["clip"]
    assert entry["deviation"]["after"] <= EQUAL and entry["deviation"]["before"] >= DIFFERENT
    assert entry["spike"] >= 10 and entry["clipped_steps"] > 0
    assert set(entry["skipped"]) == {"none", "after", "before"}


def test_precision_distribution_costs_little_against_the_precision_itself(demos):
    entry = demos[0]["precision"]
    dev, far = entry["deviation"], entry["distance_from_fp32"]
    assert dev["fp32"] <= 1e-4 and dev["bf16"] <= 0.2 * far["bf16"] and dev["fp16"] <= 0.2 * far["fp16"]
    assert entry["fp16_skipped_steps"] == entry["fp16_skipped_steps_one_device"] and entry["fp16_skipped_steps"]
    scales = entry["fp16_loss_scale"]
    assert scales[0] == 2.0 ** 24 and min(scales) < scales[0]  # overflowed at first, then backed off


def test_scaling_fixed_global_batch_is_one_run(demos):
    entry = demos[0]["scaling"]
    assert entry["deviation_fixed_global"] and all(v <= EQUAL for v in entry["deviation_fixed_global"].values())
    assert all(v >= DIFFERENT for v in entry["curve_difference_fixed_per_rank"].values())
    rel = entry["relative_to_one_device"]
    for w in entry["world_sizes"][1:]:  # the lr scaled with W keeps up with one device; unchanged, it lags
        assert rel[f"w{w}"] > rel[f"w{w}_scaled"] > 0


def test_kmeans_count_weighted_merge_equals_one_machine(demos):
    entry = demos[0]["kmeans"]
    assert len(set(entry["shard_sizes"])) == entry["world_size"]  # uneven shards
    assert entry["deviation"]["count_weighted"] <= EQUAL and entry["deviation"]["equal_weight"] >= DIFFERENT


def test_parallelism_data_sharded_and_model_parallel_equal_one_device(demos):
    entry = demos[0]["parallelism"]
    assert set(entry["deviation"]) == {"ddp", "fsdp", "model_parallel"} and max(entry["deviation"].values()) <= EQUAL
    held, comm, w = entry["state_bytes"], entry["comm_bytes"], entry["world_size"]
    assert held["fsdp"] <= (1 / w + 0.05) * held["ddp"]
    split = comm["model_parallel"]
    assert comm["ddp"][0] == comm["ddp"][-1] and split[-1] >= split[0] * 8  # batch 8 -> 128


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith("data:")]

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_with_every_plot(demos):
    summary, out, _ = demos
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    plots = [out / name / plot for name, entry in summary.items() for plot in entry["plots"]]
    assert len(page.images) == len(plots)  # one image per plot, in order
    for src, plot in zip(page.images, plots):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == plot.read_bytes()
    # nothing to fetch (readable offline): every link goes to a place on the page, the contents to each section
    assert page.links and all(link.startswith("#") for link in page.links)
    assert {link[1:] for link in page.links} <= set(page.ids)
    assert [link[1:] for link in page.links if link[1:] in summary][::2] == list(summary)
    text = " ".join(page.text)
    for entry in summary.values():
        assert entry["question"] in text and entry["conclusion"] in text
        assert not entry["conclusion"].startswith(("No:", "Yes:"))  # read after "Conclusion."
    for term in ("rounding twin", "1+1 collectives", "all_gather+Chan"):  # the glossary explains them
        assert term in text.split("Words used on this page")[-1]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["command"] == "disttrain demo all --nproc 4 --quick" and timing["seconds"] > 0
    assert f"{timing['seconds']:.0f} s" in text  # the page says when and how long, from timing.json


def test_plot_overlays_two_runs(demos, tmp_path, capsys):
    out = demos[1]
    png = tmp_path / "runs.png"
    runs = [out / "reduce" / "runs" / "mean", out / "reduce" / "runs" / "one_device"]
    assert main(["plot", *map(str, runs), "--out", str(png)]) == 0
    assert png_size(png) == (1500, 400)  # plot.RUN_PLOT_SIZE at plot.DPI
    assert str(png) in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_plot_missing_or_empty_run_dir(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run directory" in _one_error_line(capsys)
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in _one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "empty" in _one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0}\n')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must be a .png" in _one_error_line(capsys)


def test_without_matplotlib_one_line_names_the_extra(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if matplotlib were not installed
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0}\n')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    assert "pip install 'disttrain[demo]'" in _one_error_line(capsys)
    assert main(["demo", "reduce", "--out", str(tmp_path / "demos")]) == 2
    assert "pip install 'disttrain[demo]'" in _one_error_line(capsys)
    assert list((tmp_path / "demos").iterdir()) == []  # nothing trained


def test_demo_user_errors(tmp_path, capsys):
    assert main(["demo", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown demo 'nope'" in _one_error_line(capsys)
    assert main(["demo", "all", "--nproc", "1", "--out", str(tmp_path)]) == 2
    assert "--nproc" in _one_error_line(capsys)
    (tmp_path / "file").write_text("")
    assert main(["demo", "kmeans", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot create" in _one_error_line(capsys)


def test_one_demo_run_replaces_its_own_section_and_keeps_the_others(tmp_path, monkeypatch):
    """`demo all`, then one demo again into the same OUT: summary.json and report.html keep every demo, in
    order, with the new run's entry and section for that one (the demos here are stand-ins that train nothing)."""
    import disttrain.demos as demos
    from disttrain.demos.common import Check, Result, Settings

    said = {"first": "words of the first run", "second": "words of the second run"}

    def stand_in(name: str, words: list[str]):
        def plan(lab, out):
            return lambda: Result(name=name, question=f"question {name}?", experiment="none", claim="it holds",
                                  checks=[Check("checked", True)], summary=f"{name}: {words[0]}", tables=[["a"], ["1"]])
        return plan

    words = [said["first"]]
    monkeypatch.setattr(demos, "DEMOS", {n: stand_in(n, words) for n in ("alpha", "beta", "gamma")})
    (tmp_path / "summary.json").write_text("not json")  # not a summary: replaced
    demos.run_demos(["alpha", "beta", "gamma"], Settings(out=tmp_path), log=lambda line: None)
    words[0] = said["second"]
    demos.run_demos(["beta"], Settings(out=tmp_path, nproc=3, quick=True), log=lambda line: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["alpha", "beta", "gamma"]
    assert [summary[n]["conclusion"].split(": ")[1] for n in summary] == [said["first"], said["second"], said["first"]]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert [page.index(f'<h2 id="{n}"') for n in summary] == sorted(page.index(f'<h2 id="{n}"') for n in summary)
    assert page.count(said["first"]) == 2 and page.count(said["second"]) == 1
    assert "W=3 processes, quick settings" in page and "W=4 processes, full settings" in page


# --------------------------------------------------------------------------- figures, from made-up numbers

def test_parallelism_figure_names_each_way_as_the_table_does():
    from disttrain.demos import parallelism

    ways = list(parallelism.WAYS)
    sweep = (8, 128)
    fig = parallelism.figure({k: 1e-16 for k in ways}, {k: 4096 for k in ways},
                             {k: [1000 * (i + 1), 2000 * (i + 1)] for i, k in enumerate(ways)}, sweep, 4)
    names = list(parallelism.WAYS.values())
    dev_ax, held_ax, comm_ax = fig.axes
    for ax in (dev_ax, held_ax):
        assert [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in comm_ax.get_legend().get_texts()] == names


def test_precision_figure_legends_cover_no_panel():
    """Four panels on two rows; every legend lies outside every panel's plotting area."""
    from disttrain.demos import precision

    curves = {p: ([2.3 - 0.01 * s for s in range(10)], [2.3 - 0.01 * s + 1e-6 for s in range(10)])
              for p in precision.PRECISIONS}
    fp16 = {"W=4": ([2.0 ** (24 - min(s, 5)) for s in range(10)], [0, 1, 2, 3, 4]),
            "one device": ([2.0 ** (24 - min(s, 5)) for s in range(10)], [0, 1, 2, 3, 4])}
    fig = precision.figure(curves, fp16, {"fp32": 1e-7, "bf16": 1e-3, "fp16": 1e-4}, {"bf16": 2e-2, "fp16": 0.9}, 4,
                           31)
    fig.draw_without_rendering()  # the constrained layout, without drawing pixels
    renderer = fig.canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]
    assert len(panels) == 4 and len({round(p.y0) for p in panels}) == 2  # two rows
    for i, legend in enumerate(legends):
        assert not any(legend.overlaps(panel) for panel in panels), i
    width, height = fig.get_size_inches() * fig.dpi
    assert width >= 1000 and height >= 800


def _labels_inside(fig) -> None:
    """Every text of every panel (bar labels included) lies inside the figure, and bar labels inside their panel."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            assert frame.y0 <= box.y0 and box.y1 <= frame.y1 - 1, (ax.get_title(), text.get_text())
            assert page.x0 <= box.x0 and box.x1 <= page.x1


def test_bar_labels_stay_inside_the_frame_and_every_axis_is_named():
    from disttrain.demos import precision, syncbn

    curve = [2.3 - 0.01 * s for s in range(10)]
    curves = {p: (curve, curve) for p in precision.PRECISIONS}
    fp16 = {"W=4": ([2.0 ** 24] * 10, [0]), "one device": ([2.0 ** 24] * 10, [0])}
    fig = precision.figure(curves, fp16, {"fp32": 1e-7, "bf16": 1e-3, "fp16": 1e-4}, {"bf16": 2e-2, "fp16": 0.9}, 4,
                           31, {p: (1e-6, 2e-6) for p in precision.PRECISIONS})
    _labels_inside(fig)
    assert all(ax.get_ylabel() for ax in fig.axes)
    bars = fig.axes[3]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["loss curve: verify's bound",
                                                                      "parameters: verify's bound"]
    coll = {name: {"forward": 1, "backward": 1, "ops": {}, "ms": ms, "backend": "gloo"}
            for name, ms in (("disttrain", 15.9), ("disttrain all_reduce", 24.0), ("two-pass", 54.4))}
    errors = {"naive E[x^2]-E[x]^2": 1.5e5, "torch BatchNorm2d": 2e-3,
              syncbn.scheme_label("all_gather", "gloo"): 3.6e-8, syncbn.scheme_label("all_reduce", "gloo"): 1.6e-4}
    from unittest import mock

    with mock.patch.object(syncbn, "save", lambda fig, out, name: fig):  # the figure itself, not a file
        fig = syncbn._plot_exchange(Path("."), coll, errors, 4)
    _labels_inside(fig)
    assert all(ax.get_ylabel() and ax.get_xlabel() for ax in fig.axes)
    ticks = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert "disttrain\nall_reduce\non gloo" in ticks and not any("NCCL" in t for t in ticks)

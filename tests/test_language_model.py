"""Token losses: the per-token mean over the global batch's targets, exact across ranks and accumulation.

Each case trains the same config on a W-rank pool and in this process on the whole global batch, as
test_equivalence.py does, on padded sequences of uneven length (0 to T targets, -100 at the padding).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from disttrain.cli.main import main
from disttrain.config import load_config
from disttrain.run.loss import LossDivisor, summed_loss
from disttrain.parallel.sync import LocalSync
from disttrain.verify.whole import RUN_TOLERANCE, VerifyReport, compare_runs
from tests.test_factory import DEMO
from tests.common import max_rel_diff, reference, train_on_rank
from tests.test_resume import _segment, train_segment  # noqa: F401  (pool workers import it from here)

F = "tests.factories"
B, W = 31, 3  # slices of 11, 10 and 10 sequences, two micro-batches each

GPT = ("model.name=gpt", "model.hidden=16", "model.kwargs={layers: 2, heads: 2}", "train.loss=token_cross_entropy",
       f"data.name={F}:padded_tokens", "data.num_classes=13", "data.num_samples=62", f"train.global_batch_size={B}",
       "train.accumulation_steps=2", "train.steps=4", "train.device=cpu", "train.dtype=float64",
       "optim.name=adamw", "optim.lr=0.01", "clip.mode=norm", "clip.max_norm=0.5", "train.tensorboard=false")


def _train(pools, world_size: int, tmp_path, *overrides: str, name: str = "dist"
           ) -> tuple[dict, list[float], list[float], VerifyReport]:
    """The distributed run of the gpt config with ``overrides`` in tmp_path/name: (rank 0's state, losses, the
    reference's losses, what `disttrain verify` reports comparing the two runs' final.pt and metrics). The reference
    (one process, tmp_path/ref) ignores comm.* and is trained once per test."""
    ref_overrides = (*GPT, *overrides, f"train.out_dir={tmp_path / 'ref'}")
    _, ref_losses = reference(tuple(o for o in ref_overrides if not o.startswith("comm.")))
    cfg = load_config(None, [*GPT, *overrides, f"train.out_dir={tmp_path / name}"])
    (state, losses), *_ = pools(world_size).run(train_on_rank, cfg.to_dict())
    return state, losses, ref_losses, compare_runs(cfg, tmp_path / name, tmp_path / "ref")


def test_gpt_is_equivalent_and_per_rank_token_means_are_not(pools, tmp_path):
    _, losses, ref_losses, report = _train(pools, W, tmp_path)
    assert report.equivalent and report.max_param_rel_diff <= 1e-10, report.table()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
    records = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and "samples" not in r for r in records)
    # DDP's plain average of per-rank token means (the 2024 bug across devices): not the global objective.
    for mode in ("avg", "sum", "max"):  # per-rank token means, averaged, summed or maxed: the contrasts
        *_, contrast = _train(pools, W, tmp_path, f"comm.reduce={mode}", name=mode)
        assert not contrast.equivalent and contrast.max_param_rel_diff > 1e-4, (mode, contrast.table())


def test_users_language_model_with_a_rank_without_targets(pools, tmp_path):
    """A GRU language model by import path, rank 2's every sequence padding only: that rank contributes a zero
    summed loss, yet still backpropagates on the global scale and joins every collective."""
    user = (f"model.name={F}:tiny_lm", "model.kwargs={width: 8}",
            f"data.kwargs={{empty: [{B}, {W}, 2, 4]}}")
    _, losses, ref_losses, report = _train(pools, W, tmp_path, *user)
    assert report.equivalent and report.max_param_rel_diff <= 1e-10, report.table()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", [("comm.impl=fsdp", "model.recompute=true", "model.dropout=0.2"),
                                      ("comm.impl=allreduce",)])
def test_gpt_fsdp_recompute_and_allreduce(pools, tmp_path, strategy):
    """FSDP shards each block, recomputation replays each block, and per-sample dropout draws the same masks in
    the replay and on any rank."""
    *_, report = _train(pools, W, tmp_path, *strategy)
    assert report.equivalent and report.max_param_rel_diff <= 1e-10, report.table()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpt_mixed_precision_within_verify_tolerance(pools, tmp_path, precision):
    """Measured 2026-12-06, bf16: 6.9e-3 (a LayerNorm bias, which starts at zero), against verify's 1e-2. SGD: Adam's
    first steps are about lr * sign(gradient), so bf16's rounding flips whole steps of the entries whose gradient is
    near zero (DESIGN.md section 5); verify's tolerances are measured with SGD. fp16: the loss scaled (by 2^16, the
    token loss being a mean, the same scale as for samples) and unscaled on the reduced gradient."""
    mixed = ("train.dtype=float32", f"train.precision={precision}", "optim.name=sgd", "optim.lr=0.5", "clip.mode=none")
    *_, report = _train(pools, 2, tmp_path, *mixed)
    assert report.equivalent and 0 < report.max_param_rel_diff <= RUN_TOLERANCE[precision], report.table()


def test_gpt_resumed_at_another_world_size(pools, tmp_path):
    """W=3 for 3 steps, then W=2 to the end: the same model as one process throughout."""
    cfg = load_config(None, [*GPT, "train.checkpoint_every=3", f"train.out_dir={tmp_path / 'run'}"]).to_dict()
    _segment(pools, 3, cfg, False, 3)
    state = _segment(pools, 2, cfg, True, None)
    ref_state, _ = reference((*GPT, f"train.out_dir={tmp_path / 'ref'}"))
    assert max_rel_diff(state, ref_state) <= 1e-10


def test_divisor_counts_targets_globally_only_for_the_mean():
    y = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    local = LocalSync(torch.nn.Identity(), loss_divisor=2)
    divisor = LossDivisor("token_cross_entropy", local, [(None, y), (None, y[:1, :1])])
    assert int(divisor.value()) == 3 and int(divisor.local_count) == 3
    assert divisor.local_count.device == y.device  # a tensor where the targets are: NCCL has no CPU tensors
    assert LossDivisor("cross_entropy", local, [(None, y)]).value() == 2
    empty = LossDivisor("token_cross_entropy", local, [(None, y[1:])])
    assert int(empty.value()) == 1 and int(empty.local_count) == 0  # a zero gradient, not 0/0
    logits = torch.randn(2, 3, 5)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], y[0, :2], reduction="sum")
    torch.testing.assert_close(summed_loss("token_cross_entropy", logits, y), expected)


SMALL = ["train.steps=2", "train.global_batch_size=8", "data.num_samples=16", "model.hidden=8", "model.norm=none",
         "train.accumulation_steps=1"]
TOKENS = ["train.loss=token_cross_entropy", f"data.name={F}:padded_tokens", "data.num_classes=13"]
ERRORS = [
    ([*TOKENS, "model.name=gpt", f"data.name={F}:targets_out_of_range"],
     r"returned a target 13 outside \[0, 13\); a target is a token id below the vocabulary size V=13, or -100"),
    ([*TOKENS, f"model.name={F}:last_position_lm"],
     r"outputs shape \(2, 13\) for inputs of shape \(2, 8\); expected \(2, 8, 13\) \(logits per token"),
    ([*TOKENS, "model.name=gpt", "data.kwargs={inputs: float32}"],
     r"returned x of dtype torch\.float32 and shape \(16, 8\); train\.loss=token_cross_entropy needs integer token"),
    ([*TOKENS, "model.name=gpt", "model.kwargs={context: 4}"],
     r"data\.seq_len: sequences of 8 tokens exceed the gpt's context \(model\.kwargs\.context=4\)"),
    ([*TOKENS, "model.name=gpt", "model.kwargs={heads: 3}"], r"model\.kwargs\.heads=3 does not divide model\.hidden=8"),
    ([*TOKENS, "model.name=gpt", "model.kwargs={depth: 3}"], r"model\.kwargs: unknown option depth of model\.name=gpt"),
    ([*TOKENS, "model.name=mlp"], r"train\.loss=token_cross_entropy needs a language model \(model\.name=gpt"),
    (["model.name=gpt"], r"model\.name=gpt outputs logits per token: it needs train\.loss=token_cross_entropy"),
    (["train.loss=token_cross_entropy", "model.name=gpt"],
     r"train\.loss=token_cross_entropy needs token sequences: data\.name=tokens or a data factory"),
]


@pytest.mark.parametrize("overrides, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_token_setups_are_one_line_exit_2(capsys, tmp_path, overrides, message, request):
    if overrides is not ERRORS[0][0]:  # the first through launched workers, the others on the pools
        request.getfixturevalue("pooled_launches")
    argv = ["train", DEMO, "--nproc", "2", "--set", f"train.out_dir={tmp_path}"]
    for o in [*SMALL, *overrides]:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_global_batch_without_targets_names_the_step_exit_1(capsys, tmp_path):
    """Step 1's whole global batch is padding (step 0's is not): one line naming step 1, exit 1."""
    argv = ["train", DEMO, "--set", f"train.out_dir={tmp_path}", "--set", "data.kwargs={empty: [8, 1, 0, [1]]}"]
    for o in [*SMALL, *TOKENS, "model.name=gpt", "train.device=cpu"]:
        argv += ["--set", o]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"disttrain: error: step \d: the global batch has no target token \(every target is -100\).*",
                        err), err


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hugging_face_gpt2_wrapped_to_return_logits(pools, tmp_path):
    hf = (f"model.name={F}:hf_gpt2", "model.kwargs={width: 16, layers: 1}", "train.steps=3")
    *_, report = _train(pools, 2, tmp_path, *hf)
    assert report.equivalent and report.max_param_rel_diff <= 1e-10, report.table()


def test_bench_step_on_the_gpt_reports_the_token_count_cost(pools, capsys):
    from tests.test_bench import _bench_json

    tiny = ["--set", "model.hidden=8", "--set", "data.kwargs={seq_len: 8}", "--set", "data.num_samples=16",
            "--set", "train.global_batch_size=8"]
    step = _bench_json(pools, capsys, "step", "--model", "gpt", "--world-sizes", "2", "--steps", "2", "--warmup", "0",
                       "--rounds", "1", *tiny)
    row = step["rows"][0]
    assert row["count_ratio"] > 0 and 8 <= row["tokens_per_step"] <= 64 and len(row["ms"]) == 4


def test_tensorboard_logs_tokens_and_tokens_per_second(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from disttrain.observe.tensorboard import TensorBoardLog

    log = TensorBoardLog(tmp_path)
    log.log([{"step": 0, "loss": 2.5, "tokens": 128, "tokens_per_s": 1600.0, "lr": 0.1, "grad_norm": 1.0, "ms": 80.0}])
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "step_ms", "tokens",
                                                                   "tokens_per_s")}
    assert events.Scalars("train/tokens_per_s")[0].value == 1600.0

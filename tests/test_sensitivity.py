"""Never EQUIVALENT by accident: draws from a process generator leave no verdict (exit 3), and EQUIVALENT needs this
run to tell the known weighting mistakes apart (mistake twins, verify/mistakes.py).

The GPT-2 cases go through the CLI: a W=3 run trained in the session's rank pool, then `disttrain verify --against`
it in this process (reference, twins and mistake twins are one-process runs). Tiny model, few steps, float64.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from disttrain.cli.main import main
from disttrain.config import load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import run
from disttrain.verify import verdict as V
from disttrain.verify.mistakes import AVG, SUM, AsMistake, applicable
from disttrain.verify.twin import train_reference
from tests.common import train_on_rank

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")
# GPT-2 with its default dropout (0.1: attention, residual, embedding), B=31 over W=3 (11/10/10 sequences of uneven
# length), token cross entropy, float64.
GPT2 = ["model.name=tests.random_models:gpt2", "model.kwargs={width: 32, layers: 2}", "train.loss=token_cross_entropy",
        "data.name=tests.factories:padded_tokens", "data.num_classes=13", "data.num_samples=62",
        "train.global_batch_size=31", "train.steps=3", "train.device=cpu", "train.dtype=float64", "optim.name=adamw",
        "optim.lr=0.01", "train.tensorboard=false"]


def _verify_cli(pools, tmp_path, name: str, overrides: list[str], capsys) -> tuple[int, str]:
    """Train ``overrides`` at W=3 in the pool, then `disttrain verify --against` it: (exit code, output)."""
    run_dir = tmp_path / name
    cfg = load_config(None, [*GPT2, *overrides, f"train.out_dir={run_dir}"])
    pools(3).run(train_on_rank, cfg.to_dict())
    config = tmp_path / f"{name}.yaml"
    config.write_text(cfg.to_yaml())
    capsys.readouterr()
    code = main(["verify", str(config), "--against", str(run_dir), "--set", f"train.out_dir={tmp_path / (name + '-v')}"])
    return code, capsys.readouterr().out


@needs_transformers
def test_gpt2_attention_dropout_is_inconclusive_and_without_it_avg_is_caught(pools, tmp_path, capsys):
    for name, extra in (("correct", []), ("avg", ["comm.reduce=avg"])):
        code, out = _verify_cli(pools, tmp_path, name, extra, capsys)
        last = out.strip().splitlines()[-1]
        assert code == 3 and last.startswith("verdict: INCONCLUSIVE: uncontrolled randomness: attention dropout"), out
        assert "attn_pdrop=0" in last and "transformer.h.0.attn" in last
    no_attn = ["model.kwargs={width: 32, layers: 2, attn_pdrop: 0.0}"]
    code, out = _verify_cli(pools, tmp_path, "no-attn", no_attn, capsys)
    assert code == 0 and "verdict: EQUIVALENT" in out, out
    assert "mistake twin, comm.reduce=avg" in out and "sensitivity: decided by" in out
    code, out = _verify_cli(pools, tmp_path, "no-attn-avg", [*no_attn, "comm.reduce=avg"], capsys)
    assert code == 1 and "verdict: NOT EQUIVALENT" in out, out


@needs_transformers
def test_train_warns_once_after_its_first_step(tmp_path, capsys):
    cfg = load_config(None, [*GPT2, "train.steps=2", f"train.out_dir={tmp_path}"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("disttrain: warning")]
    assert len(warnings) == 1 and "attention dropout" in warnings[0] and "will not equal one device" in warnings[0]


def _mlp(tmp_path, name: str, *extra: str):
    return load_config(None, ["model.name=mlp", "model.hidden=8", "train.steps=3", "data.num_samples=64",
                              "train.dtype=float64", "train.device=cpu", "optim.momentum=0.0", "optim.weight_decay=0.0", *extra,
                              f"train.out_dir={tmp_path / name}"])


def test_mistake_twins_emulate_the_weighting_mistakes(tmp_path):
    """Plain SGD: the sum of 2 equal ranks' means is the gradient times 2, so lr 0.1 with the mistake is lr 0.2
    without; the plain average on an even split changes nothing and says so; on an uneven one it does."""
    assert applicable(_mlp(tmp_path, "a", "train.global_batch_size=32"), 2) == [SUM]
    assert applicable(_mlp(tmp_path, "a", "train.global_batch_size=31"), 2) == [AVG, SUM]
    assert applicable(_mlp(tmp_path, "a"), 1) == []
    with distributed("cpu", 60) as env:
        doubled = run(_mlp(tmp_path, "lr", "train.global_batch_size=32", "optim.lr=0.2"), env, console=False)
        hooks = {name: AsMistake(name, 2) for name in (SUM, AVG)}
        summed = train_reference(_mlp(tmp_path, "sum", "train.global_batch_size=32", "optim.lr=0.1"), env, 2,
                                 hooks=(hooks[SUM],))
        ref = train_reference(_mlp(tmp_path, "ref", "train.global_batch_size=32", "optim.lr=0.1"), env, 2)
        even = train_reference(_mlp(tmp_path, "avg", "train.global_batch_size=32", "optim.lr=0.1"), env, 2,
                               hooks=(hooks[AVG],))
        uneven = AsMistake(AVG, 3)
        train_reference(_mlp(tmp_path, "avg3", "train.global_batch_size=31", "optim.lr=0.1"), env, 3, hooks=(uneven,))
    assert max(V.state_difference(summed.model.state_dict(), doubled.model.state_dict()).values()) < 1e-13
    assert hooks[SUM].acted and not hooks[AVG].acted and uneven.acted
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, even.model.state_dict()[k])


def test_stepwise_names_a_functional_dropout_in_every_segment(pools, tmp_path):
    """A user's F.dropout: each segment's reference records it, and the run gets no verdict (INCONCLUSIVE)."""
    from disttrain.verify.stepwise import verify_stepwise

    cfg = load_config(None, ["model.name=tests.random_models:functional_dropout", "train.global_batch_size=16",
                             "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=0",
                             "data.num_samples=32", "train.dtype=float64", "train.device=cpu",
                             f"train.out_dir={tmp_path}"])
    pools(2).run(train_on_rank, cfg.to_dict())
    report = verify_stepwise(cfg, tmp_path)
    assert report.verdict == V.INCONCLUSIVE and all(s.randomness for s in report.segments)
    last = report.table().splitlines()[-1]
    assert last.startswith("verdict: INCONCLUSIVE: uncontrolled randomness: dropout(p=0.2) in the model's own forward")


def test_mistake_twin_is_the_mistaken_w_process_run(pools, tmp_path):
    """The avg and sum mistake twins (one process) end where 3 processes with comm.reduce=avg / sum end (B=31:
    11/10/10), to float64 rounding: the emulation is the mistake, not an approximation of it."""
    for name, mistake in (("avg", AVG), ("sum", SUM)):
        cfg = _mlp(tmp_path, name, "train.global_batch_size=31", "optim.lr=0.1", f"comm.reduce={name}")
        (state, losses), *_ = pools(3).run(train_on_rank, cfg.to_dict())
        with distributed("cpu", 60) as env:
            twin = train_reference(_mlp(tmp_path, name + "-twin", "train.global_batch_size=31", "optim.lr=0.1"), env,
                                   3, hooks=(AsMistake(mistake, 3),))
        assert max(V.state_difference(twin.model.state_dict(), state).values()) < 1e-12, name
        assert V.curve_difference(twin.losses, losses) < 1e-12

"""Sharded data parallel (comm.impl=fsdp) against one device, resuming across strategies and world sizes, and
activation recomputation (model.recompute): the same result bitwise, dropout masks included."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disttrain.run.build import build
from disttrain.cli.main import main as cli_main
from disttrain.config import ConfigError
from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import Trainer
from tests.common import max_rel_diff

# B=31: W=2 gives slices 16/15, W=3 gives 11/10/10 (and micro-batches of 6/5 and 5/5 with accumulation 2).
BASE = ["train.global_batch_size=31", "train.steps=4", "train.device=cpu", "data.num_samples=93",
        "train.dtype=float64", "model.name=cnn", "model.hidden=8", "optim.lr=0.2", "train.checkpoint_every=0"]
CLIP = ["clip.mode=norm", "clip.max_norm=0.3"]
# SyncBatchNorm normalises each micro-batch over the ranks: with accumulation its statistics are those of
# W-rank micro-batches, not of one device's, so the two are tested apart (as for DDP, DESIGN.md section 1).
SYNCBN, ACCUMULATE = ["model.norm=syncbn"], ["train.accumulation_steps=2"]


def train_state(cfg_dict: dict, resume: bool = False, stop_at: int | None = None) -> dict | None:
    """Train on this rank; rank 0 returns the whole model and optimizer state (gathered by the strategy), the
    losses and the bytes of parameters this rank holds, the others None."""
    cfg = config_from_dict(cfg_dict)
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env, console=False, flush_seconds=math.inf)
        result = trainer.run(resume=resume, stop_at=stop_at)
        sync = trainer.parts.sync
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in sync.model.parameters())
        state = sync.state_dict(trainer.parts.optimizer)
        kind = type(sync).__name__
    if state is None:
        return {"held": held}
    return {**state, "losses": result.losses, "held": held, "kind": kind, "grad_norms": result.grad_norms}


def config(tmp_path, name: str, *overrides: str) -> dict:
    return load_config(None, [*BASE, *overrides, f"train.out_dir={tmp_path / name}"]).to_dict()


def optimizer_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for i, entry in b["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                worst = max(worst, max_rel_diff({"v": a["state"][i][key]}, {"v": value}))
    return worst


# AdamW runs without batch norm: a conv bias before BN has a zero gradient up to rounding, which Adam's
# normalised step turns into ~1e-9 relative differences under any strategy (DDP's too).
@pytest.mark.parametrize("world_size, optim, extra", [(3, "sgd", SYNCBN), (2, "adamw", ACCUMULATE)])
def test_fsdp_equals_one_device_with_syncbn_clipping_and_accumulation(pools, tmp_path, world_size, optim, extra):
    overrides = [*CLIP, *extra, f"optim.name={optim}", "optim.lr=0.05" if optim == "adamw" else "optim.lr=0.2"]
    ref = train_state(config(tmp_path, "ref", *overrides))
    assert sum(n > 0.3 for n in ref["grad_norms"]) >= 2  # clipping is active
    out = pools(world_size).run(train_state, config(tmp_path, "fsdp", *overrides, "comm.impl=fsdp"))
    assert out[0]["kind"] == "FSDPSync"
    assert max_rel_diff(out[0]["model"], ref["model"]) <= 1e-10
    assert optimizer_difference(out[0]["optimizer"], ref["optimizer"]) <= 1e-10
    torch.testing.assert_close(torch.tensor(out[0]["losses"]), torch.tensor(ref["losses"]), rtol=1e-12, atol=0)
    # Each rank holds about 1/W of the parameters (dim-0 shards, padded to equal sizes).
    assert max(o["held"] for o in out) <= ref["held"] / world_size + 64


def test_plain_average_under_fsdp_does_not_equal_one_device(pools, tmp_path):
    """comm.reduce=avg is FSDP2's own default, the equal-weight mean of local means: wrong for slices 16/15."""
    ref = train_state(config(tmp_path, "ref", *SYNCBN))
    exact = pools(2).run(train_state, config(tmp_path, "mean", "comm.impl=fsdp", *SYNCBN))[0]
    plain = pools(2).run(train_state, config(tmp_path, "avg", "comm.impl=fsdp", "comm.reduce=avg", *SYNCBN))[0]
    assert max_rel_diff(exact["model"], ref["model"]) <= 1e-10
    assert max_rel_diff(plain["model"], ref["model"]) > 1e-3


def test_resume_across_ddp_fsdp_and_world_sizes(pools, tmp_path):
    """fsdp on 3 ranks stops at step 2; ddp on 2 ranks continues to 4 (and the other way round): both equal
    the uninterrupted run on one device, through the one checkpoint format."""
    overrides = ["train.checkpoint_every=2", "optim.name=sgd", *CLIP, *SYNCBN]
    ref = train_state(config(tmp_path, "ref", *overrides))
    for first, second, name in [((3, "fsdp"), (2, "ddp"), "a"), ((2, "ddp"), (3, "fsdp"), "b")]:
        (w1, impl1), (w2, impl2) = first, second
        pools(w1).run(train_state, config(tmp_path, name, *overrides, f"comm.impl={impl1}"), False, 2)
        out = pools(w2).run(train_state, config(tmp_path, name, *overrides, f"comm.impl={impl2}"), True)[0]
        assert max_rel_diff(out["model"], ref["model"]) <= 1e-10, name
        assert optimizer_difference(out["optimizer"], ref["optimizer"]) <= 1e-10, name
    # Step-wise verification reads the checkpoint the fsdp ranks wrote at step 4 (run b): one process retrains 2 -> 4.
    from disttrain.verify.stepwise import check_segments

    (segment,) = check_segments(config_from_dict(config(tmp_path, "b", *overrides)), tmp_path / "b", [(2, 4)],
                                "float64")
    assert segment.passed and segment.param_rel_diff <= 1e-12 and segment.world_size == 3


# --------------------------------------------------------------------------- recomputation

def _params(cfg_dict: dict) -> dict:
    out = train_state(cfg_dict)
    return {k: v for k, v in out["model"].items()}


@pytest.mark.parametrize("model", [["model.name=cnn", "model.dropout=0.3", "model.norm=bn"],
                                   ["model.name=examples.resnet:resnet", "model.norm=bn",
                                    "model.kwargs={width: 4, blocks: [1, 1], dropout: 0.3}"],
                                   ["model.name=mlp", "model.dropout=0.5", "model.norm=bn"]])
def test_recompute_is_bitwise_the_same_with_dropout(tmp_path, model):
    plain = _params(config(tmp_path, "plain", *model, "train.accumulation_steps=2"))
    again = _params(config(tmp_path, "recompute", *model, "train.accumulation_steps=2", "model.recompute=true"))
    assert plain.keys() == again.keys()
    for key in plain:
        assert torch.equal(plain[key], again[key]), key


def test_recompute_keeps_fewer_activations_and_replays_the_masks(tmp_path):
    """The saved tensors of a forward shrink; a replay outside sample_keys draws the forward's masks."""
    from disttrain.bench.memory import saved_activation_bytes

    sizes = {}
    for recompute in (False, True):
        cfg = load_config(None, [*BASE, "model.dropout=0.5", f"model.recompute={str(recompute).lower()}",
                                 "model.hidden=16", "model.norm=bn", f"train.out_dir={tmp_path}"])
        with distributed("cpu") as env:
            parts = build(cfg, env)
            micro = parts.batches.keyed_micro_batches(0, env.device, 1)
            sizes[recompute] = saved_activation_bytes(parts.sync.module, micro[0])
    assert sizes[True] * 2 <= sizes[False]


def test_fsdp_with_recompute_and_dropout_equals_one_device(pools, tmp_path):
    """A user's model by import path (the example ResNet: its blocks are the stem and each residual block),
    SyncBN and per-sample dropout, sharded and recomputed."""
    model = ["model.name=examples.resnet:resnet", "model.kwargs={width: 4, blocks: [1, 1], dropout: 0.3}", *SYNCBN]
    overrides = [*model, "model.recompute=true"]
    ref = train_state(config(tmp_path, "ref", *model))
    out = pools(2).run(train_state, config(tmp_path, "fsdp", *overrides, "comm.impl=fsdp",
                                           "comm.reshard_after_forward=false"))[0]
    assert max_rel_diff(out["model"], ref["model"]) <= 1e-10


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (["comm.impl=fsdp", "comm.reduce=max"], "comm.reduce=max: comm.impl=fsdp reduce-scatters gradients with a sum"),
    (["comm.reshard_after_forward=true"], "comm.reshard_after_forward: only for comm.impl=fsdp, not comm.impl=ddp"),
])
def test_bad_fsdp_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("=", "=")):
        load_config(None, overrides)


def test_bad_input_is_one_line_exit_2(capsys, tmp_path, pooled_launches):
    capsys.readouterr()  # the ranks' check of the model runs on the pools (a ConfigError comes back as launched)
    (tmp_path / "a.yaml").write_text(config_from_dict(config(tmp_path, "a")).to_yaml())
    code = cli_main(["train", str(tmp_path / "a.yaml"), "--nproc", "2", "--set", "comm.impl=fsdp",
                     "--set", "model.name=tests.factories:no_parameters"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("disttrain: error: comm.impl=fsdp: the model tests.factories:no_parameters has no "
                                 "trainable parameters to shard"), err
    # A checkpoint holds every tensor whole (an fsdp run gathers them), so it cannot lack one rank's shards; a file
    # that lacks tensors of the model is refused in one line, on every rank, before any is loaded.
    cfg = config(tmp_path, "b", "train.checkpoint_every=2")
    train_state(cfg, stop_at=2)
    from disttrain.checkpoint.format import checkpoint_path, load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint_path(tmp_path / "b", 2))
    del state["model"]["head.bias"]
    save_checkpoint(tmp_path / "b", state, keep=0)
    (tmp_path / "b.yaml").write_text(config_from_dict(cfg).to_yaml())
    code = cli_main(["train", str(tmp_path / "b.yaml"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("disttrain: error: checkpoint model state lacks head.bias: not a complete state of "
                                 "this model"), err


def test_replayed_block_draws_with_the_call_counts_of_its_forward():
    """One dropout layer used twice in a forward: the second block's replay must draw as call 1 again, whether the
    backward runs inside the forward's sample_keys (counts already advanced) or outside it (no keys at all)."""
    from disttrain.parallel.blocks import enable_recompute
    from disttrain.randomness import SampleDropout, SampleKeys, assign_streams, sample_keys

    def grads(recompute: bool, backward_inside: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        drop = SampleDropout(0.5)
        model = assign_streams(nn.Sequential(nn.Linear(6, 6), drop, nn.Linear(6, 6), drop)).double()
        if recompute:
            assert len(enable_recompute(model)) == 2
        x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with sample_keys(SampleKeys(0, 3, torch.arange(5))):
            loss = model(x).square().sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [p.grad for p in model.parameters()]

    plain = grads(False, True)
    for inside in (True, False):
        assert all(torch.equal(a, b) for a, b in zip(plain, grads(True, inside)))

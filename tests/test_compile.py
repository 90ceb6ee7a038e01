"""train.compile: torch.compile per block keeps the run equal to one device (float64, W=3, fsdp, SyncBatchNorm,
per-sample dropout, recomputation), and a machine without a C++ compiler gets one line before any worker starts."""

from __future__ import annotations

import pytest
import torch

from disttrain.config import ConfigError, load_config
from disttrain.parallel import compile as compile_module
from disttrain.parallel.compile import graph_breaks
from disttrain.run.build import preflight
from tests.common import max_rel_diff
from tests.test_fsdp import train_state

# The smallest run that holds every part that does not compile whole: an mlp of width 8 whose blocks are
# Linear-SyncBN-ReLU-dropout (SyncBN's collective and the dropout mask run eagerly between compiled parts).
# B=13 over W=3: slices 5/4/4.
BASE = ["model.name=mlp", "model.hidden=8", "model.norm=syncbn", "model.dropout=0.25", "train.global_batch_size=13",
        "data.num_samples=39", "train.steps=3", "train.dtype=float64", "train.device=cpu", "optim.lr=0.2",
        "train.checkpoint_every=0", "train.tensorboard=false"]


def compiled_train_state(cfg_dict: dict) -> dict | None:
    """train_state, and how many graphs dynamo compiled and broke on this rank."""
    from torch._dynamo.utils import counters

    counters.clear()
    out = train_state(cfg_dict)
    return {**(out or {}), "graphs": counters["stats"]["unique_graphs"], "breaks": graph_breaks()}


@pytest.mark.skipif(compile_module.cpp_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_fsdp_with_syncbn_dropout_and_recompute_equals_one_device(pools, tmp_path):
    ref = train_state(load_config(None, [*BASE, f"train.out_dir={tmp_path / 'ref'}"]).to_dict())
    cfg = load_config(None, [*BASE, "comm.impl=fsdp", "model.recompute=true", "train.compile=true",
                             f"train.out_dir={tmp_path / 'compiled'}"]).to_dict()
    out = pools(3).run(compiled_train_state, cfg)[0]
    assert out["graphs"] >= 3 and out["breaks"] == 0  # the three linear layers (and the ReLUs) are compiled
    assert out["kind"] == "FSDPSync"
    assert max_rel_diff(out["model"], ref["model"]) <= 1e-10
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=1e-10, atol=0)


def test_compile_without_a_cpp_compiler_is_one_config_error(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_module, "cpp_compiler", lambda: None)
    cfg = load_config(None, [*BASE, "train.compile=true", f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^train.compile=true on the CPU needs a C\+\+ compiler"):
        preflight(cfg, build_parts=False)

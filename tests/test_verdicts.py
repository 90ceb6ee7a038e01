"""Calibrated verdicts: the rounding twin's identity, each verdict, INCONCLUSIVE's exit code.

The twin (verify/twin.py) is the one-process reference with each global batch read in another order; in float64 it
must equal the reference to ~1e-15 for every model family, or its distance would not be rounding noise. Runs here
are one process, in this process (no worker pool needed): tiny models, float64, few steps.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from disttrain.checkpoint.format import save_final
from disttrain.config import load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import run
from disttrain.verify import verdict as V
from disttrain.verify.twin import train_twin
from disttrain.verify.whole import RUN_TOLERANCE, compare_runs

FAMILIES = {
    "mlp": ["model.name=mlp", "model.hidden=8"],
    "cnn-syncbn": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8"],
    "dropout-augment": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "model.dropout=0.3",
                        "data.augment=flip_crop"],
}


def _runs(tmp_path, overrides):
    cfg = load_config(None, [*overrides, "train.dtype=float64", "train.steps=4", "train.global_batch_size=13",
                             "data.num_samples=64", "train.device=cpu", "optim.lr=0.1",
                             f"train.out_dir={tmp_path / 'ref'}"])
    twin_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "twin")))
    with distributed("cpu", 60) as env:
        ref = run(cfg, env, console=False)
        twin = train_twin(twin_cfg, env)
    return ref, twin


@pytest.mark.parametrize("family", list(FAMILIES))
def test_twin_equals_the_reference_in_float64(tmp_path, family):
    ref, twin = _runs(tmp_path, FAMILIES[family])
    ref_state, twin_state = ref.model.state_dict(), twin.model.state_dict()
    worst = max(V.state_difference(twin_state, ref_state).values())
    assert worst < 1e-13, f"{family}: twin {worst:.1e} from the reference"
    assert V.curve_difference(twin.losses, ref.losses) < 1e-13
    # ... and it is another summation order, not the same computation: some rounding differs.
    assert worst > 0 or V.curve_difference(twin.losses, ref.losses) > 0

"""verify/draws.py: every draw from a process generator inside a training step is found and named, by module and
function alike, and disttrain's own per-sample draws are not. In this process, tiny models, one forward/backward."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from disttrain.randomness import SampleKeys, convert_dropout, sample_keys, uniform
from disttrain.verify.draws import OUTSIDE, Draw, DrawRecorder, describe
from tests import random_models

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


def _step(model: nn.Module, x: torch.Tensor) -> list[Draw]:
    """One training forward/backward of ``model`` (its nn.Dropout converted, as disttrain builds it) on ``x``,
    recorded."""
    model = convert_dropout(model).double().train()
    with DrawRecorder(model) as recorder, sample_keys(SampleKeys(0, 0, torch.arange(len(x)))):
        model(x).sum().backward()
    return recorder.draws


@needs_transformers
def test_gpt2_attention_dropout_is_named_with_its_config_key():
    """GPT-2's attention dropout goes into scaled_dot_product_attention(dropout_p=0.1): both layers' attention is
    named, with the config key to set; its residual and embedding nn.Dropout layers are keyed by disttrain."""
    torch.manual_seed(0)
    draws = _step(random_models.gpt2((8,), 64), torch.randint(0, 64, (3, 8)))
    assert [d.module for d in draws] == ["model.transformer.h.0.attn", "model.transformer.h.1.attn"], draws
    assert {(d.call, d.p, d.config_keys, d.config_class) for d in draws} == {
        ("scaled_dot_product_attention", 0.1, ("attn_pdrop",), "GPT2Config")}
    line = describe(draws)
    assert "\n" not in line and "attention dropout" in line and "attn_pdrop=0" in line
    assert "model.transformer.h.0.attn" in line
    script = describe(draws, script=True)
    assert "set attn_pdrop=0 in the model's GPT2Config for the check" in script and "disttrain" not in script


@needs_transformers
def test_gpt2_without_attention_dropout_draws_nothing():
    """attn_pdrop=0 leaves only GPT-2's nn.Dropout layers (residual 0.1, embedding 0.1), keyed per sample."""
    torch.manual_seed(0)
    assert _step(random_models.gpt2((8,), 64, attn_pdrop=0.0), torch.randint(0, 64, (3, 8))) == []


def test_functional_dropout_and_rand_are_named_by_module():
    x = torch.randn(4, 6, dtype=torch.float64)
    draws = _step(random_models.functional_dropout((6,), 3, p=0.25), x)
    assert [(d.module, d.call, d.p, d.count) for d in draws] == [("", "dropout", 0.25, 1)], draws
    assert "dropout(p=0.25)" in describe(draws) and "nn.Dropout" in describe(draws)
    # A script under `disttrain check` has no per-sample keys: its remedy is to turn the draws off for the check.
    script = describe(draws, script=True)
    assert "dropout(p=0.25)" in script and "turn those draws off (a dropout's probability to 0) for the check" in script
    assert "disttrain" not in script and "nn.Dropout" not in script
    draws = _step(random_models.noisy_input((6,), 3), x)
    assert [(d.module, d.call) for d in draws] == [("", "rand_like")], draws


def test_a_draw_outside_any_module_of_the_model():
    model = nn.Linear(3, 1).double()
    with DrawRecorder(model) as recorder:
        (model(torch.randn(2, 3, dtype=torch.float64)) * torch.rand(1, dtype=torch.float64)).sum().backward()
    assert [d.module for d in recorder.draws if d.call == "rand"] == [OUTSIDE]
    assert [d.module for d in recorder.draws if d.call == "randn"] == [OUTSIDE]


def test_disttrain_per_sample_draws_are_not_recorded():
    """nn.Dropout / Dropout2d converted to SampleDropout, and the keyed uniforms of augmentation: no generator."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Dropout2d(0.3), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 2))
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    assert _step(model, x) == []
    with DrawRecorder() as recorder:
        uniform(SampleKeys(1, 2, torch.arange(5)), 0, 7)
    assert recorder.draws == []


def test_unconverted_dropout_is_named_by_class_without_a_model_and_hooks_are_removed():
    hooks = (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks))
    model, x = nn.Sequential(nn.Linear(3, 3), nn.AlphaDropout(0.2)), torch.randn(4, 3)
    with DrawRecorder() as recorder:
        model(x)
    assert [d.module for d in recorder.draws] == ["AlphaDropout"], recorder.draws
    assert (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks)) == hooks
    with pytest.raises(ValueError), DrawRecorder(model):  # an error in the step still removes the hooks
        raise ValueError
    assert (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks)) == hooks


def test_describe_without_draws():
    assert describe([]).startswith("no random draws")

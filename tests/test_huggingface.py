"""Hugging Face models and datasets as they are: a ModelOutput needs no wrapper, dict items are called by name and
padded on the right, ``train.loss: causal_lm`` shifts Hugging Face's labels and divides by the global count of
shifted targets, and a config's directory is importable wherever the command runs.

The end-to-end case is one CLI verify at W=3, B=31, float64 on examples/hf_gpt2.py (copied beside a config in a
temporary directory, run from another one), whose per-step losses are checked against the objective of transformers'
Trainer with ``average_tokens_across_devices=True`` computed here independently: one process, the whole global batch
padded to its longest, sum of shifted per-token cross entropies / number of shifted non-ignored targets, AdamW.
(The dataset below returns plain dicts of tensors, as a ``datasets.Dataset`` in torch format does; the last test
reads a real one. disttrain check runs the Trainer itself: tests/test_check.py.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from disttrain.cli.main import main
from disttrain.config import load_config
from disttrain.data.batching import global_batch_indices
from disttrain.data.named import NamedInputs, collate
from disttrain.errors import ConfigError
from disttrain.factory import IMPORT_DIRS
from disttrain.models.calling import logits_of
from disttrain.run.build import build_data, build_data_and_model
from disttrain.run.loss import loss_targets, summed_loss, target_count

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed (it is in the test extra)")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_gpt2.py"
HERE = "tests.test_huggingface"


def _gpt2(vocab: int = 64, **config):
    from examples.hf_gpt2 import gpt2

    return gpt2((8,), vocab, layers=2, width=32, heads=2, **config).double()


def _items(n: int, seed: int = 0) -> list[dict]:
    from examples.hf_gpt2 import counting

    data = counting(n, seed, vocab=64, min_len=4, max_len=20)
    return [data[i] for i in range(n)]


def _padded(items: list[dict], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels of ``items`` padded on the right to ``length`` (here, not by disttrain)."""
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], mask[row, :n], labels[row, :n] = item["input_ids"], 1, item["labels"]
    return ids, mask, labels


def test_causal_lm_is_transformers_loss_over_the_shifted_count():
    """disttrain's causal_lm (sum / count) is what transformers' GPT-2 computes when told the count of shifted
    targets (num_items_in_batch); transformers' Trainer in 5.25 counts the unshifted labels instead, one more per
    sequence."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    items = _items(16)
    x, y = collate(items, list(range(16)))
    out = model(**x)
    assert logits_of(out) is out.logits  # a ModelOutput: no wrapper
    count = int(target_count([y], "causal_lm"))
    unshifted = int((y != -100).sum())
    assert count == unshifted - len(items) == sum(len(i["input_ids"]) - 1 for i in items)
    ours = summed_loss("causal_lm", out, y) / count
    # Independently: position t scored against label t + 1, in float64.
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, ce / count, rtol=1e-15, atol=0)
    # transformers' own loss (it upcasts to float32) over the same count; over the unshifted count it is smaller.
    hf = model(**x, labels=y, num_items_in_batch=torch.tensor(count)).loss
    torch.testing.assert_close(hf.double(), ours, rtol=1e-6, atol=0)
    hf_unshifted = model(**x, labels=y, num_items_in_batch=torch.tensor(unshifted)).loss
    torch.testing.assert_close(hf_unshifted.double(), ours * count / unshifted, rtol=1e-6, atol=0)
    # The shift keeps the logits' shape; the last position has no target.
    assert loss_targets("causal_lm", y).shape == y.shape and (loss_targets("causal_lm", y)[:, -1] == -100).all()


def test_padding_does_not_change_the_loss_or_the_gradients():
    """A rank pads its slice to the slice's longest sequence, one process the whole batch to the batch's: for a
    causal model with right padding the summed loss and every gradient are the same (float64, rounding only)."""
    torch.manual_seed(0)
    model = _gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode, no dropout
    items = _items(5, seed=1)
    longest = max(len(i["input_ids"]) for i in items)
    results = []
    for length in (longest, longest + 7):
        ids, mask, labels = _padded(items, length)
        model.zero_grad()
        loss = summed_loss("causal_lm", model(input_ids=ids, attention_mask=mask), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-12, atol=1e-15, msg=name)


# Data factories for the error cases (data.name: tests.test_huggingface:NAME).
def no_labels(num_samples, seed):
    return [{"input_ids": torch.arange(4)} for _ in range(num_samples)]


def ragged_without_mask(num_samples, seed):
    return [{"input_ids": torch.arange(3 + i % 2), "labels": torch.arange(3 + i % 2)} for i in range(num_samples)]


def bad_mask(num_samples, seed):
    return [{"input_ids": torch.arange(4), "attention_mask": torch.full((4,), 2), "labels": torch.arange(4)}
            for _ in range(num_samples)]


def short_labels(num_samples, seed):
    return [{"input_ids": torch.arange(4), "labels": torch.arange(3)} for _ in range(num_samples)]


def outputs_a_tuple(input_shape, num_classes):
    return _Tuple(num_classes)


class _Tuple(torch.nn.Module):
    """Takes named inputs, but returns its logits in a tuple (transformers' return_dict=False)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):
        return (self.embedding(input_ids),)


HF = ("train.loss=causal_lm", "data.num_samples=8", "data.num_classes=64", "train.global_batch_size=4",
      "model.name=examples.hf_gpt2:gpt2", "train.device=cpu")


@pytest.mark.parametrize("factory, message", [
    ("no_labels", "item 0 has no 'labels' (its keys: input_ids)"),
    ("ragged_without_mask", "have 3 and 4 tokens and no 'attention_mask'"),
    ("bad_mask", "an 'attention_mask' that is not 0s and 1s"),
    ("short_labels", "'labels' has shape (3,) and 'input_ids' (4,)"),
])
def test_dict_items_that_cannot_be_batched_are_one_line(factory, message):
    cfg = load_config(None, [*HF, f"data.name={HERE}:{factory}"])
    with pytest.raises(ConfigError) as info:
        source = build_data(cfg)
        source.fetch(np.arange(4))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert f"data.name: '{HERE}:{factory}'" in str(info.value)


def test_model_without_logits_is_one_line_exit_2(capsys, tmp_path):
    argv = ["train", str(ROOT / "configs" / "hf_gpt2.yaml"), "--set", f"train.out_dir={tmp_path}",
            "--set", f"model.name={HERE}:outputs_a_tuple", "--set", "model.kwargs={}", "--set", "train.device=cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "returned tuple, which is neither a tensor nor carries a tensor 'logits'" in err and "\n" not in err, err


def test_named_inputs_slice_and_move_like_a_tensor():
    x, y = collate(_items(6), list(range(6)))
    assert isinstance(x, NamedInputs) and set(x.keys()) == {"input_ids", "attention_mask"} and len(x) == 6
    part = x[1:3]
    assert isinstance(part, NamedInputs) and part.shape == (2, x.shape[1]) and torch.equal(part["input_ids"],
                                                                                          x["input_ids"][1:3])
    assert x.to(torch.float64)["attention_mask"].dtype == torch.float64 and x.device.type == "cpu"
    assert (y[x["attention_mask"] == 0] == -100).all() and (x["input_ids"][x["attention_mask"] == 0] == 0).all()


def test_a_module_beside_the_config_imports_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(IMPORT_DIRS, "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "cfgdir" / "beside_config_gpt2.py")
    config = tmp_path / "cfgdir" / "hf.yaml"
    config.write_text("data: {name: 'beside_config_gpt2:counting', num_samples: 8, num_classes: 64}\n"
                      "model: {name: 'beside_config_gpt2:gpt2'}\n"
                      "train: {loss: causal_lm, global_batch_size: 4, device: cpu}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(config)
    data, model = build_data_and_model(cfg, torch.device("cpu"))
    assert type(model).__name__ == "GPT2LMHeadModel" and len(data) == 8
    assert os.environ[IMPORT_DIRS] == str(tmp_path / "cfgdir")  # what spawned workers inherit


def _hf_objective_losses(steps: int, batch: int, num_samples: int, lr: float) -> list[float]:
    """The Trainer's objective (average_tokens_across_devices=True) trained in one process on every global batch:
    sum of shifted per-token cross entropies over the whole batch / number of shifted non-ignored targets."""
    from examples.hf_gpt2 import counting

    torch.manual_seed(0)  # disttrain builds the model under a generator seeded with the config's seed (0)
    model = _gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = counting(num_samples, 0)
    losses = []
    for step in range(steps):
        items = [data[int(i)] for i in global_batch_indices(step, batch, num_samples, 0)]
        ids, mask, labels = _padded(items, max(len(i["input_ids"]) for i in items))
        logits = model(input_ids=ids, attention_mask=mask).logits
        shifted = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100,
                               reduction="sum") / (shifted != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_unwrapped_gpt2_on_dict_data_is_equivalent_at_3_ranks_through_the_cli(tmp_path, monkeypatch, capsys):
    """`disttrain verify CONFIG --nproc 3` on an unwrapped GPT2LMHeadModel, dict items with labels = input_ids and
    train.loss: causal_lm, B=31, float64, run from a directory that is not the config's (the factory module sits
    beside the config): EQUIVALENT, and each step's loss is the Trainer's objective."""
    monkeypatch.setenv(IMPORT_DIRS, "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "project").mkdir()
    (tmp_path / "cwd").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "project" / "my_hf_models.py")
    config = tmp_path / "project" / "hf.yaml"
    steps, batch, samples, lr = 3, 31, 62, 0.01
    config.write_text(
        f"data: {{name: 'my_hf_models:counting', num_samples: {samples}, num_classes: 64}}\n"
        "model: {name: 'my_hf_models:gpt2', kwargs: {layers: 2, width: 32, heads: 2, attn_pdrop: 0.0, "
        "resid_pdrop: 0.0, embd_pdrop: 0.0}}\n"
        f"optim: {{name: adamw, lr: {lr}, weight_decay: 0.0}}\n"
        f"train: {{loss: causal_lm, global_batch_size: {batch}, steps: {steps}, dtype: float64, device: cpu, "
        f"out_dir: {tmp_path / 'run'}, tensorboard: false}}\n")
    monkeypatch.chdir(tmp_path / "cwd")
    code = main(["verify", str(config), "--nproc", "3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "EQUIVALENT", report
    assert report["max_param_rel_diff"] <= 1e-10
    expected = _hf_objective_losses(steps, batch, samples, lr)
    got = [s["loss_distributed"] for s in report["steps"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)



def test_a_datasets_dataset_in_torch_format_reads_as_the_same_dicts(tmp_path):
    """A ``datasets.Dataset`` with torch format, as Hugging Face's examples make it, gives every rank the same
    slices of every global batch as the plain dataset of dicts it was made from (W=3, B=31, an epoch crossed)."""
    pytest.importorskip("datasets")
    from disttrain.data.loader import GlobalBatches

    cfg = load_config(ROOT / "configs" / "hf_gpt2.yaml")
    plain = build_data(cfg)
    cfg.data.name = "examples.hf_gpt2:counting_dataset"
    hub = build_data(cfg)
    for rank in range(3):
        a, b = (GlobalBatches(d, 31, cfg.seed, rank, 3) for d in (plain, hub))
        for (_, ma), (_, mb) in zip(a.steps(0, 18, torch.device("cpu"), 1), b.steps(0, 18, torch.device("cpu"), 1)):
            (xa, ya), (xb, yb) = ma[0][:2], mb[0][:2]
            assert set(xa.keys()) == set(xb.keys()) == {"input_ids", "attention_mask"}
            assert all(torch.equal(xa[k], xb[k]) for k in xa.keys()) and torch.equal(ya, yb)

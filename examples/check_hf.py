"""A Hugging Face Trainer script (a tiny GPT-2 from GPT2Config, no download) on text of uneven length.

    disttrain check --nproc 2 --reference-args "--batch 8" -- examples/check_hf.py --batch 4
    disttrain check --nproc 2 --reference-args "--batch 8" -- examples/check_hf.py --batch 4 --no-average-tokens

The samples are paragraphs of a Python standard library module as byte tokens (real text on every machine), so
ranks hold different numbers of target tokens. With ``average_tokens_across_devices`` (the default) the Trainer
divides each rank's summed token loss by the global count: one device's token mean. Without it, each rank's own
token mean, averaged by DDP: another weighting.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--no-average-tokens", dest="average_tokens", action="store_false",
                    help="average_tokens_across_devices=False")
parser.add_argument("--dropout", type=float, default=0.0, help="GPT-2's dropouts (its default is 0.1)")
parser.add_argument("--out", default="runs/check_hf")
args = parser.parse_args()

PAD, SEQ = 256, 48
text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
docs = [list(p.strip(b"\n"))[:SEQ] for p in text.split(b"\n\n") if len(p.strip(b"\n")) > 1]
dataset = [{"input_ids": d, "labels": d} for d in docs]


def collate(items: list[dict]) -> dict:
    """Pad to the batch's longest (labels with -100: no loss there)."""
    n = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), n), PAD)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for row, item in enumerate(items):
        k = len(item["input_ids"])
        ids[row, :k], labels[row, :k], mask[row, :k] = torch.tensor(item["input_ids"]), torch.tensor(item["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


torch.manual_seed(0)
config = GPT2Config(vocab_size=PAD + 1, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=args.dropout,
                    embd_pdrop=args.dropout, attn_pdrop=args.dropout)
model = GPT2LMHeadModel(config).double()
training = TrainingArguments(
    output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-2,
    lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, seed=0, data_seed=0, use_cpu=True,
    average_tokens_across_devices=args.average_tokens, report_to=[], logging_strategy="no", save_strategy="no",
    disable_tqdm=True, ddp_backend="gloo", dataloader_drop_last=True)
Trainer(model=model, args=training, train_dataset=dataset, data_collator=collate).train()

"""A DDP language-model loop whose loss is each rank's own token mean: `disttrain check` finds it.

    disttrain check --nproc 2 --reference-args "--batch 16" -- examples/check_token_mean.py --batch 8
    disttrain check --nproc 2 --reference-args "--batch 16" -- examples/check_token_mean.py --batch 8 --global-count

Sequences are paragraphs of a Python standard library module as byte tokens, so ranks hold different numbers of
target tokens. ``F.cross_entropy(..., ignore_index=-100)`` averages over this rank's tokens, and DDP averages the
ranks' gradients with equal weight: a rank with fewer tokens weighs each of them more than one device does
(transformers #34242). ``--global-count`` divides the summed token loss by the global token count (one all_reduce
of the count) times W, which DDP's average takes back: the one-device token mean.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8, help="sequences per process and step")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--global-count", action="store_true", help="divide by the global token count")
args = parser.parse_args()

SEQ = 33
text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
docs = [torch.tensor(list(p.strip(b"\n"))[:SEQ]) for p in text.split(b"\n\n") if len(p.strip(b"\n")) > 1]


def collate(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, padded to SEQ - 1 (target -100: no loss)."""
    x = torch.zeros(len(items), SEQ - 1, dtype=torch.long)
    y = torch.full((len(items), SEQ - 1), -100)
    for row, d in enumerate(items):
        x[row, :len(d) - 1], y[row, :len(d) - 1] = d[:-1], d[1:]
    return x, y


dist.init_process_group("gloo")
sampler = DistributedSampler(docs, shuffle=True, seed=0)
loader = DataLoader(docs, batch_size=args.batch, sampler=sampler, collate_fn=collate, drop_last=True)
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Embedding(256, 16), nn.Tanh(), nn.Linear(16, 256)).double())
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
step = 0
while step < args.steps:
    sampler.set_epoch(step)
    for x, y in loader:
        logits = model(x)
        if args.global_count:
            count = (y != -100).sum().double()
            dist.all_reduce(count)  # the global number of target tokens, summed over ranks
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") * dist.get_world_size() / count
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # this rank's token mean
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
dist.destroy_process_group()

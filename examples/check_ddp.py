"""A plain DDP training loop, as the PyTorch tutorials write it: what `disttrain check` proves equal to one device.

    disttrain check --nproc 2 --reference-args "--batch 32" -- examples/check_ddp.py --batch 16

Each rank reads its share of every global batch through DistributedSampler (one seeded shuffle: the W ranks' batch
k together is the one process's batch k at W times the batch size), DDP averages the ranks' gradients of their
mean losses. ``--reduction sum`` sums the per-sample losses instead: W ranks then take W times the step.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
parser.add_argument("--reduction", default="mean", choices=["mean", "sum"])
args = parser.parse_args()
dtype = getattr(torch, args.dtype)

dist.init_process_group("gloo")
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 16, generator=g, dtype=dtype)
y = (x @ torch.randn(16, 4, generator=g, dtype=dtype)).argmax(dim=1)
dataset = TensorDataset(x, y)
sampler = DistributedSampler(dataset, shuffle=True, seed=0)
loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler)

torch.manual_seed(0)  # the same initial weights on every rank
model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
step = 0
for epoch in itertools.count():
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb, reduction=args.reduction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
    if step == args.steps:
        break
if dist.get_rank() == 0:
    print(f"trained {step} steps, last loss {loss.item():.4f}")
dist.destroy_process_group()

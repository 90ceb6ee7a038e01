"""An FSDP2 loop (``fully_shard``: each rank holds a shard of every parameter) that `disttrain check` proves.

    disttrain check --nproc 2 --reference-args "--batch 32" -- examples/check_fsdp.py --batch 16

The check records every parameter as its full tensor (``DTensor.full_tensor()``). FSDP2 divides the reduce-scattered
gradient by W: the ranks' mean losses average to one device's on the global batch.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

dist.init_process_group("gloo")
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 16, generator=g, dtype=torch.float64)
y = (x @ torch.randn(16, 4, generator=g, dtype=torch.float64)).argmax(dim=1)
dataset = TensorDataset(x, y)
sampler = DistributedSampler(dataset, shuffle=True, seed=0)
loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer)  # one all-gather before its forward, one reduce-scatter after its backward
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
step = 0
for epoch in itertools.count():
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
    if step == args.steps:
        break
dist.destroy_process_group()

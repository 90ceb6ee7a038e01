"""A DDP loop with plain BatchNorm: each rank normalises its own slice. `disttrain check` finds it.

    disttrain check --nproc 2 --reference-args "--batch 32" -- examples/check_batchnorm.py --batch 16
    disttrain check --nproc 2 --reference-args "--batch 32" -- examples/check_batchnorm.py --batch 16 --sync

At W ranks BatchNorm's statistics are the slice's, at one device the global batch's: the outputs, the loss and the
gradients differ. ``--sync`` converts the model with disttrain's SyncBatchNorm (torch's runs on GPUs only), whose
statistics are the global batch's.
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
parser.add_argument("--sync", action="store_true", help="SyncBatchNorm (disttrain's, CPU and GPU)")
args = parser.parse_args()

dist.init_process_group("gloo")
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 16, generator=g, dtype=torch.float64) * 3 + 1
y = (x @ torch.randn(16, 4, generator=g, dtype=torch.float64)).argmax(dim=1)
dataset = TensorDataset(x, y)
sampler = DistributedSampler(dataset, shuffle=True, seed=0)
loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).double()
if args.sync:
    import disttrain

    model = disttrain.convert_sync_batchnorm(model)
model = DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
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

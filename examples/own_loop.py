"""A training loop of one's own, plain torch with stock DDP, made exactly equal to one device by disttrain's parts.

    torchrun --nproc-per-node 3 examples/own_loop.py        # any world size: the same losses and weights

Each part removes one way a W-process run drifts from one device on the global batch: a seeded global batch cut
into contiguous, uneven slices (B=31 over 3 ranks: 11, 10, 10), gradients summed rather than averaged by DDP with
each rank's summed loss divided by the global count, batch norm over the global batch, clipping of the global
gradient, and a warmup schedule that steps once per optimizer step. ``--plain`` trains the usual way instead
(local mean loss, DDP's average): exact only when every rank holds B/W samples.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import disttrain


def make_dataset(num_samples: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 8, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(8, 3, generator=g, dtype=torch.float64)).argmax(dim=1)
    return TensorDataset(x, y)


def train(steps: int = 6, global_batch_size: int = 31, exact: bool = True, seed: int = 0) -> dict:
    """Train on the process group torchrun (or disttrain.testing) set up; rank 0's state and global losses."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()
    model = disttrain.convert_sync_batchnorm(model)  # statistics over the global batch, one collective each way
    ddp = DistributedDataParallel(model)
    if exact:
        disttrain.register_sum_hook(ddp)  # sum the gradients over ranks: no division by W
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    scheduler = disttrain.warmup_schedule(optimizer, warmup_steps=2, total_steps=steps)
    dataset = make_dataset(seed=seed)
    sampler = disttrain.GlobalBatchSampler(len(dataset), global_batch_size, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler)
    losses = []
    for x, y in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps):
        loss_sum = F.cross_entropy(ddp(x), y, reduction="sum")
        if exact:  # this rank's share of the global mean: sum of its losses over the global count
            loss = loss_sum / disttrain.global_count(len(y))
        else:  # the usual local mean, which DDP then averages with equal weight per rank
            loss = loss_sum / len(y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP reduces the gradients here, bucket by bucket
        disttrain.clip_grad_norm_(ddp, max_norm=0.5)  # every rank now holds the global gradient
        optimizer.step()
        scheduler.step()
        logged = torch.stack([loss_sum.detach(), torch.tensor(float(len(y)), dtype=torch.float64)])
        dist.all_reduce(logged)  # the global mean loss: one collective for the sum and the count
        losses.append((logged[0] / logged[1]).item())
    return {"state": model.state_dict(), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch-size", type=int, default=31)
    parser.add_argument("--plain", action="store_true", help="local mean loss and DDP's average (not exact)")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    result = train(args.steps, args.global_batch_size, exact=not args.plain)
    if dist.get_rank() == 0:
        for step, loss in enumerate(result["losses"]):
            print(f"step {step}  loss {loss:.15f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A Lightning module trained with ``strategy="ddp"`` on CPU, checked against one device by `disttrain check`.

    disttrain check --nproc 2 --reference-args "--devices 1 --batch 32" -- examples/check_lightning.py --devices 2 --batch 16

Lightning gives each process a DistributedSampler and DDP averages the ranks' mean losses. Its DistributedSampler
shuffles (seeded) for training even where the DataLoader does not: with ``strategy="ddp"`` at one device too, so the
reference reads the same batches; with ``--strategy auto`` one device reads the data in order, and the check's data
line says so:

    disttrain check --nproc 2 --reference-args "--devices 1 --strategy auto --batch 32" -- examples/check_lightning.py --devices 2 --batch 16
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--strategy", default="ddp", help="Lightning's strategy (auto: one device reads in order)")
args = parser.parse_args()


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


L.seed_everything(0, verbose=False)
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 16, generator=g, dtype=torch.float64)
y = (x @ torch.randn(16, 4, generator=g, dtype=torch.float64)).argmax(dim=1)
loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_steps=args.steps, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Classifier(), loader)

"""What the check's recording costs per optimizer step: a 10M-parameter MLP timed with and without the hook.

    python examples/check_cost.py            # the loop alone
    python examples/check_cost.py --hook     # with disttrain check's hook, as a checked script runs it

One process, float32, SGD, batch 32. With ``--hook`` every step's 10M parameters are copied and written to a
temporary directory (torch.save), and every training forward's inputs are hashed, as under `disttrain check`.
Prints the median milliseconds per step over the steps after the first.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--hook", action="store_true", help="record as disttrain check does")
parser.add_argument("--steps", type=int, default=12)
args = parser.parse_args()
if args.hook:  # what the check's sitecustomize does before a script's first line
    from disttrain.check import hook

    os.environ[hook.ENV_DIR] = tempfile.mkdtemp(prefix="check-cost-")
    os.environ[hook.ENV_STEPS] = str(args.steps + 1)  # never the last: the loop ends by itself
    inside: list[float] = []  # seconds spent in the hook's recording, per call

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside.append(time.perf_counter() - start)
        return wrapper

    # Runs after the hook's own exit handler (registered later, run first): the records go with the process.
    atexit.register(shutil.rmtree, os.environ[hook.ENV_DIR], True)
    for name in ("_after_step", "_note"):  # the parameters' copy and write; the samples' hashes
        setattr(hook._Recorder, name, timed(getattr(hook._Recorder, name)))
    hook.install()

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 4608), nn.ReLU(), nn.Linear(4608, 1024), nn.ReLU(), nn.Linear(1024, 1024))
params = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1024), torch.randn(32, 1024)
times = []
for step in range(args.steps):
    start = time.perf_counter()
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
print(f"{params / 1e6:.1f}M parameters, {'with' if args.hook else 'without'} the hook: "
      f"{1e3 * statistics.median(times[1:]):.1f} ms per step (median of {len(times) - 1})"
      + (f"; inside the hook {1e3 * sum(inside) / args.steps:.1f} ms per step" if args.hook else ""))

"""Inside the checked script's processes: the hook it cannot see.

``disttrain check`` starts every process of the script with a ``sitecustomize`` on its PYTHONPATH that calls
:func:`install` before the script's first line. Nothing in the script changes; three things in torch do:

- ``torch.optim.optimizer.register_optimizer_step_post_hook`` (global: every ``step()`` of every optimizer):
  after each optimizer's k-th step its parameters are written to the records (a DTensor, FSDP2's shard, as its
  full tensor: an all-gather, which every rank calls in the same order because every rank steps the same
  optimizers); before its first step, the initial parameters (step 0).
- ``nn.Module.__call__``: the outermost call of a module in training mode with gradients on is the training
  forward; each sample of its inputs (the rows of its tensors: ``model(x)``, ``model(**batch)``) is hashed, so
  the check knows which samples every step saw without knowing the data loader (a loader that prefetches, as
  accelerate's and Lightning's do, would misplace samples by a step). Positions an ``attention_mask`` marks as
  padding are left out: the same text padded to another batch's length is the same sample. The modules that run
  in training mode are noted too: Dropout (randomness per process) and BatchNorm that is not synchronised.
- the data loader's ``__next__``, only in a rounding twin: the rows of every batch in a seeded order. Every
  per-batch mean, sum, count and batch statistic is invariant to that order, so the twin is the reference in
  exact arithmetic and another rounding of it in floating point.

After ``DISTTRAIN_CHECK_STEPS`` steps of every optimizer the process writes its last record, waits (a file
barrier, no collective) until every rank of its run has, and exits at once: nothing of the script runs after the
last recorded step, and no rank leaves a peer inside a collective.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from .samples import apply_rows, fingerprints, leaves

ENV_DIR = "DISTTRAIN_CHECK_DIR"  # this process's record directory
ENV_STEPS = "DISTTRAIN_CHECK_STEPS"  # optimizer steps to record, then exit
ENV_PERMUTE = "DISTTRAIN_CHECK_PERMUTE"  # twins: the seed of each batch's row order
ENV_PROCS = "DISTTRAIN_CHECK_PROCS"  # processes of this run (the file barrier waits for all of them)
BARRIER_S = 60.0
_WRAPPERS = ("module.", "_orig_mod.", "_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def install() -> None:
    """Install the hooks when this process is one the check started (and not a data loader's worker)."""
    import multiprocessing

    if ENV_DIR not in os.environ or multiprocessing.parent_process() is not None:
        return
    _Recorder(Path(os.environ[ENV_DIR]), int(os.environ.get(ENV_STEPS, "10")), int(os.environ.get("RANK", "0")),
              int(os.environ.get(ENV_PROCS, "1")), os.environ.get(ENV_PERMUTE))


def strip_wrappers(name: str) -> str:
    """A parameter's name without the prefixes that wrappers add (DDP's ``module.``, compile, Lightning, FSDP)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    for inner in ("._orig_mod.", "._fsdp_wrapped_module.", "._checkpoint_wrapped_module."):
        name = name.replace(inner, ".")
    return name


class _Recorder:
    def __init__(self, out: Path, steps: int, rank: int, procs: int, permute: str | None):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils.data import dataloader

        self.out, self.steps, self.rank, self.procs = out, steps, rank, procs
        self.dir = out / f"rank{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.created: list[weakref.ref] = []  # every optimizer constructed, in order
        self.order: dict[int, int] = {}  # id(optimizer) -> its index (order of first step)
        self.counts: Counter = Counter()  # index -> steps taken
        self.keys: dict[int, list[tuple[str, Any]]] = {}  # index -> [(key, parameter)]
        self.names: dict[str, str] = {}
        self.samples: list[str] = []  # fingerprints since optimizer 0's last step
        self.depth = 0
        self.seen: dict[int, tuple[str, str, float]] = {}  # id(module) -> (kind, class, p) of noted modules
        self.noted: dict[str, tuple[str, str, float]] = {}
        self.permute = None if permute is None else int(permute)
        self.batches = 0
        self.finished = False
        self.autocast: str | None = None  # the training forward's autocast dtype, if any
        self.group_size: int | None = None  # the default process group's size at the first step (0: none)
        self.draws: Any = None  # verify's DrawRecorder over the first step (forward, backward, optimizer step)
        self.draw_lines: tuple[str, list] = ("", [])
        self.torch = torch

        init = torch.optim.Optimizer.__init__
        recorder = self

        def optimizer_init(opt: Any, *args: Any, **kwargs: Any) -> None:
            init(opt, *args, **kwargs)
            recorder.created.append(weakref.ref(opt))

        torch.optim.Optimizer.__init__ = optimizer_init
        register_optimizer_step_pre_hook(self._before_step)
        register_optimizer_step_post_hook(self._after_step)
        call = torch.nn.Module.__call__

        def module_call(module: Any, *args: Any, **kwargs: Any) -> Any:
            if module.training:
                recorder._note(module, args, kwargs)
                if recorder.draws is None and recorder.depth == 0 and torch.is_grad_enabled():
                    recorder._watch_draws(module)
            recorder.depth += 1
            try:
                return call(module, *args, **kwargs)
            finally:
                recorder.depth -= 1

        torch.nn.Module.__call__ = module_call
        if self.permute is not None:
            fetch = dataloader._BaseDataLoaderIter.__next__

            def next_batch(it: Any) -> Any:
                return recorder._permuted(fetch(it))

            dataloader._BaseDataLoaderIter.__next__ = next_batch
        atexit.register(self._at_exit)

    # -- the training forward: samples and modules ------------------------------------------------------------
    def _note(self, module: Any, args: tuple, kwargs: dict) -> None:
        torch = self.torch
        if self.depth == 0 and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self.samples.extend(fingerprints(args, kwargs))
            self.autocast = self.autocast or _autocast(torch)
        if id(module) in self.seen:
            return
        kind = ""
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            kind = "dropout"
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and "Sync" not in type(module).__name__:
            kind = "batchnorm"
        self.seen[id(module)] = (kind, type(module).__name__, float(getattr(module, "p", 0.0)))

    def _permuted(self, batch: Any) -> Any:
        torch = self.torch
        sizes = {t.shape[0] for t in leaves(batch) if isinstance(t, torch.Tensor) and t.dim() >= 1}
        self.batches += 1
        if len(sizes) != 1:
            return batch  # no common row count: left as it is (the twin is then the reference)
        n = sizes.pop()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.permute * 1_000_003 + self.batches))
        return apply_rows(batch, lambda t: t[order.to(t.device)] if t.dim() >= 1 and t.shape[0] == n else t)

    # -- the optimizer steps ----------------------------------------------------------------------------------
    def _index(self, opt: Any) -> int:
        if id(opt) not in self.order:
            index = self.order[id(opt)] = len(self.order)
            names = self._module_names()
            self.keys[index] = [(f"{index}.{g}.{j}", p) for g, group in enumerate(opt.param_groups)
                                for j, p in enumerate(group["params"])]
            for key, p in self.keys[index]:
                self.names[key] = names.get(id(p), f"optimizer {index} group {key.split('.')[1]} "
                                                   f"parameter {key.split('.')[2]}")
        return self.order[id(opt)]

    def _module_names(self) -> dict[int, str]:
        """id(parameter) -> its name in the outermost module that holds it (wrappers' prefixes removed)."""
        import gc
        import warnings

        with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
            warnings.simplefilter("ignore")
            modules = [o for o in gc.get_objects() if isinstance(o, self.torch.nn.Module)]
        children = {id(c) for m in modules for c in m._modules.values() if c is not None}
        names: dict[int, str] = {}
        for root in sorted((m for m in modules if id(m) not in children),
                           key=lambda m: -sum(1 for _ in m.parameters())):
            for name, p in root.named_parameters():
                names.setdefault(id(p), strip_wrappers(name))
        return names

    def _before_step(self, opt: Any, args: tuple, kwargs: dict) -> None:
        index = self._index(opt)
        if self.counts[index] == 0:
            self._save(index, 0, samples=False)

    def _watch_draws(self, module: Any) -> None:
        """Every draw from a process generator in the first step, named (verify/draws.py): a TorchDispatchMode,
        so it costs on every op, and only the first step is watched."""
        from ..verify.draws import DrawRecorder

        self.draws = DrawRecorder(module)
        try:
            self.draws.__enter__()
        except Exception:  # noqa: BLE001 (a script whose modes forbid another: the modules' view stays)
            self.draws = False

    def _stop_draws(self) -> None:
        if not self.draws or self.draw_lines[0]:
            return
        from ..verify.draws import describe

        try:
            self.draws.__exit__(None, None, None)
            found = self.draws.draws
            self.draw_lines = (describe(found, script=True) if found else "",
                               [(d.module, d.op, d.count, d.call, d.p) for d in found])
        except Exception:  # noqa: BLE001
            self.draw_lines = ("", [])
        self.draws = False

    def _after_step(self, opt: Any, args: tuple, kwargs: dict) -> None:
        self._stop_draws()
        index = self._index(opt)
        self.counts[index] += 1
        if self.group_size is None:  # at the first step: a script may destroy its group before it exits
            dist = self.torch.distributed
            self.group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0
        self._save(index, self.counts[index], samples=index == 0)
        live = [r() for r in self.created]
        pending = [o for o in live if o is not None and id(o) not in self.order and _has_params(o)]
        done = min(self.counts[i] for i in self.order.values())
        if (done >= self.steps and not pending) or done > self.steps:
            self._finish("done")

    def _save(self, index: int, step: int, samples: bool) -> None:
        record: dict[str, Any] = {"params": {key: _full(p) for key, p in self.keys[index]}}
        if samples:
            record["samples"], self.samples = self.samples, []
        torch = self.torch
        tmp = self.dir / f".o{index}_s{step}.pt"
        torch.save(record, tmp)
        os.replace(tmp, self.dir / f"o{index}_s{step}.pt")

    # -- the end -------------------------------------------------------------------------------------------------
    def _meta(self, how: str) -> dict[str, Any]:
        modules = [(kind, cls, p) for kind, cls, p in self.seen.values() if kind]
        dtypes = sorted({str(p.dtype).replace("torch.", "") for keys in self.keys.values() for _, p in keys})
        return {"how": how, "steps": dict(self.counts), "names": self.names, "dtypes": dtypes,
                "optimizers": {i: type(o()).__name__ for i, o in ((self.order.get(id(r())), r) for r in self.created)
                               if i is not None and o() is not None},
                "group_size": self.group_size or 0,
                "draws": self.draw_lines[0], "draw_list": self.draw_lines[1],
                "autocast": self.autocast, "modules": Counter(modules), "batches_permuted": self.batches}

    def _finish(self, how: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.torch.save(self._meta(how), self.dir / "meta.pt")
        (self.dir / how).touch()
        if how != "done":
            return
        # Every rank has written its last record before any exits: a peer may still be in its last collective.
        deadline = time.monotonic() + BARRIER_S
        while time.monotonic() < deadline and sum(1 for _ in self.out.glob("rank*/done")) < self.procs:
            time.sleep(0.02)
        os._exit(0)

    def _at_exit(self) -> None:
        self._finish("ended")


def _full(p: Any) -> Any:
    """A parameter's whole value on the CPU, in its own dtype (float64 is what the checker turns it into: exact)."""
    data = p.detach()
    if hasattr(data, "full_tensor"):
        data = data.full_tensor()  # FSDP2/DTensor: an all-gather, called by every rank in the same order
    return data.to("cpu", copy=True)


def _has_params(opt: Any) -> bool:
    return any(len(g["params"]) for g in opt.param_groups)


def _autocast(torch: Any) -> str | None:
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                return str(torch.get_autocast_dtype(device)).replace("torch.", "")
        except (RuntimeError, AttributeError):
            continue
    return None

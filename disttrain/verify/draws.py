"""Random draws that disttrain does not key per sample: found, named, and their remedy said.

A W-process run equals one device only if every random draw is the same in both. disttrain's own draws are pure
functions of the sample they are for (randomness.py: integer hashes, no generator), so they are. A draw from the
process's generator (``torch.rand``, ``F.dropout``, the dropout of ``scaled_dot_product_attention(dropout_p=...)``
that transformers' GPT-2 uses) is not: rank r's generator draws for its slice, the one process's for the whole
batch, so the masks differ and the runs part by far more than rounding (measured: a float64 GPT-2 with its default
attention dropout, 1.7e-1 between two one-process runs that differ only in summation order).

Every ATen op that draws from a generator carries the tag ``torch.Tag.nondeterministic_seeded`` (bernoulli_,
native_dropout, rand*, randn*, uniform_, normal_, multinomial, ...), so a ``TorchDispatchMode`` sees each draw below
autograd, whether a module or a functional call made it. Two more views name it: a global module forward pre/post
hook keeps the stack of modules in progress (the innermost known one is the draw's module, its qualified name from
``named_modules``), and a ``TorchFunctionMode`` records the outermost torch function in progress (the draw of an SDPA
with dropout reaches ATen as a ``bernoulli_``; the function says it was attention dropout, with its probability).
A Hugging Face config above the module (``module.config``) gives the remedy: its keys holding that probability.

The modes see every op, so they cost (a recorded step of a small model takes 2-3x as long): verify and ``train``
record one step (drawhook.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SEEDED = torch.Tag.nondeterministic_seeded
OUTSIDE = "(outside the model's modules)"  # the module of a draw made where no module of the model was running
# The dropout probability of the functional calls that take one: the argument's name and position.
_PROBABILITY = {"scaled_dot_product_attention": ("dropout_p", 4), "dropout": ("p", 1), "dropout1d": ("p", 1),
                "dropout2d": ("p", 1), "dropout3d": ("p", 1), "alpha_dropout": ("p", 1),
                "feature_alpha_dropout": ("p", 1)}
_ATTENTION = ("attn", "attention")


@dataclass(frozen=True)
class Draw:
    """Draws from a process generator: ``count`` ATen ops ``op`` made while ``module`` ran (its qualified name in
    the model; OUTSIDE: none of the model's modules), inside the torch function ``call`` (e.g.
    "scaled_dot_product_attention"; "" unknown) with dropout probability ``p`` (None: not a dropout call), and
    ``config_keys``: the keys of a Hugging Face config above the module whose value is that probability."""

    module: str
    op: str
    count: int
    call: str = ""
    p: float | None = None
    config_keys: tuple[str, ...] = ()
    config_class: str = ""


class _Functions(TorchFunctionMode):
    """The outermost torch function in progress (inner ones run with the mode popped, so they are not seen)."""

    def __init__(self):
        super().__init__()
        self.current: tuple[str, float | None] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        outer, self.current = self.current, (name, _probability(name, args, kwargs))
        try:
            return func(*args, **kwargs)
        finally:
            self.current = outer


def _probability(name: str, args: tuple, kwargs: dict) -> float | None:
    where = _PROBABILITY.get(name)
    if where is None:
        return None
    key, index = where
    value = kwargs.get(key, args[index] if len(args) > index else None)
    return float(value) if isinstance(value, (int, float)) else None


class DrawRecorder(TorchDispatchMode):
    """Records every draw from a process generator while it is entered (a context manager): ``.draws``.

    ``model``: names the modules (qualified names from its ``named_modules``; modules outside it are not named).
    Without a model, every module is named by its class. Entered around a training step, it sees the forward,
    the backward (recomputed segments included) and the optimizer step; disttrain's per-sample draws
    (SampleDropout, augmentation) make no generator op and are never recorded.
    """

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self._names = None if model is None else {id(m): name for name, m in model.named_modules()}
        self._modules: dict[int, nn.Module] = {}
        self._stack: list[nn.Module] = []
        self._counts: dict[tuple, int] = {}
        self._configs: dict[tuple, tuple[tuple[str, ...], str]] = {}
        self._functions = _Functions()
        self._handles: list = []

    # ------------------------------------------------------------------ the module stack

    def _name(self, module: nn.Module) -> str | None:
        if self._names is None:
            return type(module).__name__
        return self._names.get(id(module))

    def _push(self, module, args) -> None:
        if self._name(module) is not None:
            self._stack.append(module)

    def _pop(self, module, args, output) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def __enter__(self) -> DrawRecorder:
        # train.compile compiles blocks lazily, in the first step: torch warns that global module hooks fire once more
        # for a compiled module's wrapper, which names nothing here (it is not among the model's modules).
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        self._stack.clear()
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._push),
                         nn.modules.module.register_module_forward_hook(self._pop, always_call=True)]
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._functions.__exit__(*exc)
            for handle in self._handles:
                handle.remove()
            self._handles, self._stack = [], []
            self._warnings.__exit__(*exc)

    # ------------------------------------------------------------------ the draws

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _SEEDED in func.tags and not _without_dropout(func, args, kwargs, self._functions.current):
            module = self._stack[-1] if self._stack else None
            call, p = self._functions.current or ("", None)
            key = (None if module is None else id(module), str(func), call, p)
            if module is not None:
                self._modules[id(module)] = module
            self._counts[key] = self._counts.get(key, 0) + 1
            if module is not None and key not in self._configs:
                self._configs[key] = _config_keys(self._stack, call, p)
        return func(*args, **(kwargs or {}))

    @property
    def draws(self) -> list[Draw]:
        """Every kind of draw seen, in the order first seen: module, op, how many, the call and its remedy keys."""
        out = []
        for key, count in self._counts.items():
            module_id, op, call, p = key
            name = OUTSIDE if module_id is None else self._name(self._modules[module_id])
            keys, config_class = self._configs.get(key, ((), ""))
            out.append(Draw(module=OUTSIDE if name is None else name, op=op, count=count, call=call, p=p, config_keys=keys,
                            config_class=config_class))
        return out


def _without_dropout(func, args: tuple, kwargs: dict | None, call: tuple[str, float | None] | None) -> bool:
    """True for an op tagged as drawing that draws nothing: a dropout of probability 0 (SDPA's fused kernels carry
    the tag for their dropout_p argument whatever its value; F.dropout(p=0) keeps every element)."""
    if call is not None and call[1] == 0.0:
        return True
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = (kwargs or {}).get(arg.name, args[i] if i < len(args) else arg.default_value)
            return isinstance(value, (int, float)) and value == 0
    return False


def _config_keys(stack: list[nn.Module], call: str, p: float | None) -> tuple[tuple[str, ...], str]:
    """The keys of the nearest Hugging Face config above the innermost module (``module.config`` with ``to_dict``)
    that set this draw's probability: float keys naming dropout whose value is ``p`` (any dropout key above 0 when
    ``p`` is unknown); for an attention call, the attention ones among them when there are any."""
    for module in reversed(stack):
        config = getattr(module, "config", None)
        if config is None or not callable(getattr(config, "to_dict", None)):
            continue
        values = {k: v for k, v in config.to_dict().items() if "drop" in k.lower() and isinstance(v, (int, float))
                  and not isinstance(v, bool) and v > 0}
        keys = [k for k, v in values.items() if p is None or math.isclose(v, p, rel_tol=1e-9)]
        if "attention" in call:
            keys = [k for k in keys if any(a in k.lower() for a in _ATTENTION)] or keys
        return tuple(keys), type(config).__name__
    return (), ""


def _where(draws: list[Draw]) -> Iterator[str]:
    seen: dict[tuple[str, float | None], list[str]] = {}
    for d in draws:
        seen.setdefault((d.call or d.op, d.p), []).append(d.module or "the model's own forward")
    for (call, p), modules in seen.items():
        modules = list(dict.fromkeys(modules))
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        what = (f"attention dropout in {call}(dropout_p={p:g})" if "attention" in call and p is not None else
                f"{call}(p={p:g})" if p is not None else call)
        yield f"{what} in {shown}"


def describe(draws: list[Draw], script: bool = False) -> str:
    """One line: what draws from a process generator, where, why that breaks equivalence, and the remedy.

    ``script``: the draws of a script that ``disttrain check`` runs, which has no per-sample keys of disttrain's:
    there the remedy is to turn the draws off for the check (nn.Dropout is keyed per sample only by disttrain's
    own trainer)."""
    if not draws:
        return "no random draws outside disttrain's per-sample keys"
    count = sum(d.count for d in draws)
    ops = ", ".join(dict.fromkeys(d.op for d in draws))
    keys = list(dict.fromkeys(k for d in draws for k in d.config_keys))
    classes = list(dict.fromkeys(d.config_class for d in draws if d.config_keys))
    where = "; ".join(_where(draws))
    if script:
        off = (f"set {', '.join(f'{k}=0' for k in keys)} in the model's {'/'.join(classes)}" if keys
               else "turn those draws off (a dropout's probability to 0)")
        return (f"uncontrolled randomness: {where} draws from the process's random generator ({count} draws: {ops}): "
                f"each rank draws for its own slice and the reference for the whole batch, so they cannot match "
                f"whatever the seeds; to check the arithmetic, {off} for the check")
    if keys:
        remedy = (f"set {', '.join(f'{k}=0' for k in keys)} in the model's {'/'.join(classes)} (its nn.Dropout "
                  "layers disttrain keys per sample by itself)")
    else:
        remedy = ("draw through nn.Dropout layers (disttrain keys them per sample) or disttrain.randomness.uniform "
                  "instead, or turn the draw off")
    return (f"uncontrolled randomness: {where} draws from the process's random generator "
            f"({count} draws: {ops}), not from disttrain's per-sample keys, so W processes and one process draw "
            f"differently and cannot match; {remedy}")


__all__ = ["Draw", "DrawRecorder", "describe", "OUTSIDE"]

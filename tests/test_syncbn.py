"""SyncBatchNorm against torch batch norm on the global batch, on gloo worker pools of 2, 3 and 4 ranks.

Every multi-rank test sends all of its cases in one pool.run; the workers build their own slices of the
same seeded data, and the test process computes the single-device reference and compares.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from disttrain.parallel.syncbn import BatchNormXd, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

EXACT = 1e-10  # float64 equivalence
STEPS = 3
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# ---------------------------------------------------------------------------------------------- data

def _rank_batch(case: dict, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (x, dy) at ``step``: seeded, so workers and the reference build the same tensors."""
    spatial = case["spatial"][rank] if case.get("per_rank_spatial") else case["spatial"]
    shape = (case["counts"][rank], case["channels"], *spatial)
    g = torch.Generator().manual_seed(1000 * step + rank)
    offset = torch.linspace(-2.0, 3.0, case["channels"], dtype=torch.float64).view((1, -1) + (1,) * len(spatial))
    x = offset + (1.0 + offset.abs()) * torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dy


def _affine_values(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return 1.0 + torch.rand(channels, generator=g, dtype=torch.float64), torch.randn(channels, generator=g,
                                                                                        dtype=torch.float64)


def _make_layer(layer: nn.Module, case: dict) -> nn.Module:
    layer = layer.double()
    if case["affine"]:
        weight, bias = _affine_values(case["channels"])
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layer


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Differentiable re-layout of the layer input: channels_last, or a non-contiguous (channel-major) view."""
    if layout == "channels_last":
        return x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    if layout == "noncontig":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _case(counts, channels, spatial, momentum=0.1, affine=True, track=True, layout="contiguous",
          per_rank_spatial=False) -> dict:
    return dict(counts=counts, channels=channels, spatial=spatial, momentum=momentum, affine=affine, track=track,
                layout=layout, per_rank_spatial=per_rank_spatial)


CASES = {
    2: [_case([5, 3], 3, (4, 4)),
        _case([4, 3], 3, (3, 5), momentum=None, layout="channels_last"),
        _case([3, 2], 2, [(5,), (7,)], per_rank_spatial=True),  # spatial size differs per rank
        _case([0, 2], 4, ())],
    3: [_case([4, 0, 3], 3, (5,), momentum=None, affine=False),
        _case([2, 3, 1], 2, (2, 3, 2), track=False, layout="channels_last"),
        _case([3, 3, 3], 5, (), layout="noncontig")],
    4: [_case([2, 3, 0, 1], 3, (2, 2, 3), layout="noncontig"),
        _case([5, 0, 0, 2], 2, (3, 3), affine=False, track=False),
        _case([1, 1, 1, 1], 3, (), momentum=None)],  # one sample per rank: local batch norm would raise
}


# ------------------------------------------------------------------------------------------ workers

def _train_steps(cases: list[dict], collectives: tuple[str, ...]) -> list[dict]:
    """On every rank: STEPS training steps then one eval step of SyncBatchNorm, per case and collective."""
    rank, out = dist.get_rank(), []
    for case in cases:
        for collective in collectives:
            layer = _make_layer(SyncBatchNorm(case["channels"], momentum=case["momentum"], affine=case["affine"],
                                              track_running_stats=case["track"]), case)
            layer.collective = collective
            record = dict(y=[], dx=[], dweight=[], dbias=[], formats=[])
            for step in range(STEPS + 1):
                layer.train(step < STEPS)
                x, dy = _rank_batch(case, rank, step)
                x.requires_grad_()
                inp = _layout(x, case["layout"])
                if case["layout"] == "channels_last":
                    fmt = _CHANNELS_LAST[x.dim()]
                    inp.register_hook(lambda g, fmt=fmt: record["formats"].append(g.is_contiguous(memory_format=fmt)))
                y = layer(inp)
                if case["layout"] == "channels_last":
                    record["formats"].append(y.is_contiguous(memory_format=fmt))
                record["y"].append(y.detach())
                if step == STEPS:
                    break
                layer.zero_grad()
                (y * dy).sum().backward()
                record["dx"].append(x.grad)
                if case["affine"]:
                    record["dweight"].append(layer.weight.grad.clone())
                    record["dbias"].append(layer.bias.grad.clone())
            record["buffers"] = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("weight", "bias")}
            out.append(record)
    return out


def _reference(case: dict, world_size: int) -> dict:
    """The same steps with torch batch norm on the concatenated global batch, in this process."""
    # Spatial sizes that differ per rank cannot be concatenated; batch norm over the (values, C) rows of
    # every rank is the same computation.
    ndim = 2 if case["per_rank_spatial"] else 2 + len(case["spatial"])
    torch_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    layer = _make_layer(torch_class(case["channels"], momentum=case["momentum"], affine=case["affine"],
                                    track_running_stats=case["track"]), case)
    ref = dict(y=[], dx=[], dweight=[], dbias=[])
    for step in range(STEPS + 1):
        layer.train(step < STEPS)
        batches = [_rank_batch(case, r, step) for r in range(world_size)]
        if case["per_rank_spatial"]:
            shapes = [x.shape for x, _ in batches]
            xs = [x.movedim(1, -1).reshape(-1, case["channels"]) for x, _ in batches]
            dys = [dy.movedim(1, -1).reshape(-1, case["channels"]) for _, dy in batches]
        else:
            xs, dys = [x for x, _ in batches], [dy for _, dy in batches]
        sizes = [x.shape[0] for x in xs]
        if step == STEPS and not case["track"]:  # eval without running stats: each rank's own batch statistics
            ys = [layer(x) for x in xs]
        else:
            x = torch.cat(xs).requires_grad_()
            y = layer(x)
            ys = list(y.detach().split(sizes))
        if case["per_rank_spatial"]:
            ys = [y.reshape(s[:1] + s[2:] + s[1:2]).movedim(-1, 1) for y, s in zip(ys, shapes)]
        ref["y"].append([y.detach() for y in ys])
        if step == STEPS:
            break
        layer.zero_grad()
        (y * torch.cat(dys)).sum().backward()
        dx = list(x.grad.split(sizes))
        if case["per_rank_spatial"]:
            dx = [g.reshape(s[:1] + s[2:] + s[1:2]).movedim(-1, 1) for g, s in zip(dx, shapes)]
        ref["dx"].append(dx)
        if case["affine"]:
            ref["dweight"].append(layer.weight.grad.clone())
            ref["dbias"].append(layer.bias.grad.clone())
    ref["buffers"] = {k: v for k, v in layer.state_dict().items() if k not in ("weight", "bias")}
    return ref


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _compare(case: dict, got: list[dict], ref: dict) -> float:
    """Largest difference between the ranks' results and the reference, asserting shapes along the way."""
    worst = 0.0
    for r, rec in enumerate(got):
        for step in range(STEPS + 1):
            worst = max(worst, _max_diff(rec["y"][step], ref["y"][step][r]))
        for step in range(STEPS):
            worst = max(worst, _max_diff(rec["dx"][step], ref["dx"][step][r]))
        assert rec["buffers"].keys() == ref["buffers"].keys()
        for k, v in ref["buffers"].items():
            worst = max(worst, _max_diff(rec["buffers"][k].to(v.dtype), v))
            assert rec["buffers"][k].dtype == v.dtype
        assert all(rec["formats"]) and len(rec["formats"]) == (2 * STEPS + 1 if case["layout"] == "channels_last" else 0)
    for key in ("dweight", "dbias"):  # local gradients: their sum over ranks is the single-device gradient
        assert len(ref[key]) == (STEPS if case["affine"] else 0)
        for step in range(len(ref[key])):
            worst = max(worst, _max_diff(sum(rec[key][step] for rec in got), ref[key][step]))
    return worst


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_matches_torch_batchnorm_on_the_global_batch(pools, world_size):
    cases = CASES[world_size]
    collectives = ("all_gather", "all_reduce")
    per_rank = pools(world_size).run(_train_steps, cases, collectives)
    for i, case in enumerate(cases):
        ref = _reference(case, world_size)
        for j, collective in enumerate(collectives):
            got = [records[i * len(collectives) + j] for records in per_rank]
            worst = _compare(case, got, ref)
            assert worst < EXACT, f"{collective} {case}: max abs difference {worst:.3g}"


def test_per_rank_batchnorm_differs_from_the_global_reference():
    """The comparison above can fail: batch norm on each rank's slice alone is far from the reference."""
    case = CASES[2][0]
    ref = _reference(case, 2)
    layer = _make_layer(nn.BatchNorm2d(case["channels"]), case)
    local = layer(_rank_batch(case, 0, 0)[0]).detach()
    assert _max_diff(local, ref["y"][0][0]) > 1e-2


# ------------------------------------------------------------------------------------ collectives

_COLLECTIVE_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
                     "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                     "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")


class _CountCollectives:
    """Wraps the torch.distributed collectives; counts outermost calls by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._depth = 0
        self._saved = {name: getattr(dist, name) for name in _COLLECTIVE_NAMES if hasattr(dist, name)}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls.append(name)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls

    def __enter__(self):
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _count_collectives(counts: list[int]) -> dict:
    rank = dist.get_rank()
    seen: dict = {}
    with _CountCollectives() as counter:
        for collective in (None, "all_gather", "all_reduce"):
            layer = SyncBatchNorm(3).double()
            layer.collective = collective
            x = torch.randn(counts[rank], 3, 4, dtype=torch.float64, requires_grad=True)
            y = layer(x)
            seen[(collective, "forward")] = counter.take()
            y.sum().backward()
            seen[(collective, "backward")] = counter.take()
            y = layer(x.detach())  # input without grad: weight/bias gradients are local, nothing to exchange
            seen[(collective, "forward, input without grad")] = counter.take()
            y.sum().backward()
            seen[(collective, "backward, input without grad")] = counter.take()
            layer.eval()
            layer(x)
            seen[(collective, "eval")] = counter.take()
        singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank creates all
        counter.take()
        layer = SyncBatchNorm(3, process_group=singles[rank]).double()
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        reference = nn.BatchNorm1d(3).double()
        y = layer(x)
        y.sum().backward()
        seen["group of one"] = counter.take()
        seen["group of one, difference"] = _max_diff(y, reference(x))
    return seen


def test_one_collective_forward_one_backward_none_in_eval(pools):
    per_rank = pools(3).run(_count_collectives, [2, 0, 3])
    for rank, seen in enumerate(per_rank):  # rank 1 is empty and still joins both collectives
        for collective, expected in ((None, "all_gather"), ("all_gather", "all_gather"), ("all_reduce", "all_reduce")):
            assert seen[(collective, "forward")] == [expected], (rank, collective)
            assert seen[(collective, "backward")] == [expected], (rank, collective)
            assert seen[(collective, "forward, input without grad")] == [expected], (rank, collective)
            assert seen[(collective, "backward, input without grad")] == [], (rank, collective)
            assert seen[(collective, "eval")] == [], (rank, collective)
        assert seen["group of one"] == [] and seen["group of one, difference"] == 0.0


# ------------------------------------------------------------------------------------ edge cases

def _edge_cases() -> dict:
    rank, out = dist.get_rank(), {}
    for collective in ("all_gather", "all_reduce"):
        layer = SyncBatchNorm(3, momentum=None).double()
        layer.collective = collective
        layer(torch.randn(4 * (rank + 1), 3, dtype=torch.float64))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.zeros(0, 3, 5, dtype=torch.float64, requires_grad=True)  # every rank empty
        y = layer(x)
        y.sum().backward()
        out[(collective, "empty")] = dict(before=before, after=layer.state_dict(), y=y.detach(), dx=x.grad,
                                          dweight=layer.weight.grad)
        try:  # one value per channel in the whole group
            layer(torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64))
            out[(collective, "count one")] = None
        except ValueError as e:
            out[(collective, "count one")] = str(e)
    return out


def test_empty_global_batch_and_global_count_one(pools):
    for rank, out in enumerate(pools(2).run(_edge_cases)):
        for collective in ("all_gather", "all_reduce"):
            empty = out[(collective, "empty")]
            for k, v in empty["before"].items():
                assert torch.equal(empty["after"][k], v), (rank, collective, k)  # unchanged, no NaN
            assert empty["y"].shape == (0, 3, 5) and empty["dx"].shape == (0, 3, 5)
            assert torch.equal(empty["dweight"], torch.zeros(3, dtype=torch.float64))
            assert "Expected more than 1 value per channel when training" in out[(collective, "count one")]


# --------------------------------------------------------------------------------------- gradcheck

class _CopyToRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (the input is shared by all of them)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _SumOverRanks(torch.autograd.Function):
    """all_reduce forward; identity backward (every rank computes the same global function)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _gradcheck(counts: list[int], collective: str) -> bool:
    """gradcheck of the *global* map (x_all, w, b) -> y_all on every rank, in lockstep.

    Each rank takes its slice of x_all, runs SyncBatchNorm, and the zero-padded outputs are summed over ranks,
    so every rank evaluates the same function on the same perturbed inputs and all collectives stay aligned.
    """
    rank, channels = dist.get_rank(), 2
    start, stop = sum(counts[:rank]), sum(counts[:rank + 1])
    layer = SyncBatchNorm(channels, track_running_stats=False).double()
    layer.collective = collective

    def global_map(x_all, weight, bias):
        x_all, weight, bias = (_CopyToRanks.apply(t) for t in (x_all, weight, bias))
        y = functional_call(layer, {"weight": weight, "bias": bias}, (x_all[start:stop],))
        padded = torch.cat([x_all[:start] * 0, y, x_all[stop:] * 0])
        return _SumOverRanks.apply(padded)

    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(sum(counts), channels, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (1 + torch.rand(channels, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(channels, generator=g, dtype=torch.float64, requires_grad=True)
    return torch.autograd.gradcheck(global_map, (x_all, weight, bias))


def test_gradcheck_across_ranks(pools):
    assert pools(3).run(_gradcheck, [2, 0, 3], "all_gather") == [True] * 3
    assert pools(3).run(_gradcheck, [1, 3, 1], "all_reduce") == [True] * 3


# -------------------------------------------------------------------------------- hard numerics

def _hard_batch(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Channels: mean 1e4 / std 1e-2, mean -1e4 / std 1e-2, constant 7, mean 1e3 / std 8 (bfloat16 resolves it)."""
    g = torch.Generator().manual_seed(11 + rank)
    z = torch.randn(6 - 2 * rank, 4, 8, 8, generator=g, dtype=torch.float64)
    mean = torch.tensor([1e4, -1e4, 7.0, 1e3], dtype=torch.float64).view(1, 4, 1, 1)
    std = torch.tensor([1e-2, 1e-2, 0.0, 8.0], dtype=torch.float64).view(1, 4, 1, 1)
    return (mean + std * z).to(dtype)


def _hard_numerics() -> dict:
    rank, out = dist.get_rank(), {}
    for dtype in (torch.float32, torch.bfloat16):
        for collective in ("all_gather", "all_reduce"):
            layer = SyncBatchNorm(4, momentum=1.0)  # float32 parameters; running stats = this batch's stats
            layer.collective = collective
            y = layer(_hard_batch(rank, dtype))
            out[(dtype, collective)] = (layer.running_mean.clone(), layer.running_var.clone(), y.detach())
    return out


def test_hard_numerics_mean_much_larger_than_std(pools):
    per_rank = pools(2).run(_hard_numerics)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.cat([_hard_batch(r, dtype) for r in range(2)]).double()  # the values the ranks hold
        var_ref, mean_ref = torch.var_mean(x, (0, 2, 3), correction=1)  # float64, two-pass
        y_ref = (x - mean_ref.view(1, 4, 1, 1)) / (x.var((0, 2, 3), correction=0).view(1, 4, 1, 1) + 1e-5).sqrt()
        for collective in ("all_gather", "all_reduce"):
            for rank, out in enumerate(per_rank):
                mean, var, y = out[(dtype, collective)]
                assert var.dtype == torch.float32 and y.dtype == dtype
                rel = ((var.double() - var_ref).abs() / var_ref.clamp(min=1e-300))
                assert rel[[0, 1, 3]][var_ref[[0, 1, 3]] > 0].max() < 1e-3, (dtype, collective, rel)
                assert torch.where(var_ref == 0, var.double() - var_ref, 0).abs().max() < 1e-6
                assert var[2].item() < 1e-6  # the constant channel
                assert ((mean.double() - mean_ref).abs() / mean_ref.abs()).max() < 1e-6
                y_local = y_ref[:6] if rank == 0 else y_ref[6:]
                y_tol = 1e-3 if dtype == torch.float32 else 0.1  # bfloat16 output keeps 8 bits
                assert (y.double() - y_local).abs().max() < y_tol * (1 + y_local.abs().max()), (dtype, collective)
    # The case is hard: E[x^2] - E[x]^2 in float32 is off by far more than the tolerance above.
    x = torch.cat([_hard_batch(r, torch.float32) for r in range(2)])
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    exact = x.double().var((0, 2, 3), correction=0)
    assert ((naive.double() - exact).abs() / exact)[0] > 1e-3


# ----------------------------------------------------------------------- half precision, layouts

def _half_precision() -> dict:
    """bfloat16/float16 input with float32 parameters (autocast style) and a .half() model, channels_last."""
    rank, out = dist.get_rank(), {}
    for dtype in (torch.bfloat16, torch.float16):
        for half_model in (False, True):
            g = torch.Generator().manual_seed(5 + rank)
            x = (3 + 2 * torch.randn(3 + rank, 4, 5, 6, generator=g)).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            dy = torch.randn(x.shape, generator=g).to(dtype)
            layer = SyncBatchNorm(4)
            if half_model:
                layer = layer.to(dtype)
            y = layer(x)
            y.backward(dy)
            out[(dtype, half_model)] = dict(
                x=x.detach(), dy=dy, y=y.detach(), dx=x.grad, dweight=layer.weight.grad, dbias=layer.bias.grad,
                running_mean=layer.running_mean.clone(), running_var=layer.running_var.clone(),
                y_channels_last=y.is_contiguous(memory_format=torch.channels_last),
                dx_channels_last=x.grad.is_contiguous(memory_format=torch.channels_last))
    return out


def test_half_precision_inputs_and_channels_last(pools):
    per_rank = pools(2).run(_half_precision)
    for dtype in (torch.bfloat16, torch.float16):
        for half_model in (False, True):
            got = [out[(dtype, half_model)] for out in per_rank]
            param_dtype = dtype if half_model else torch.float32
            # float64 reference on the very values the ranks hold
            x = torch.cat([g["x"] for g in got]).double().requires_grad_()
            ref = nn.BatchNorm2d(4).double()
            y = ref(x)
            y.backward(torch.cat([g["dy"] for g in got]).double())
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # a few units in the last place of the output dtype
            sizes = [g["x"].shape[0] for g in got]
            for g, y_ref, dx_ref in zip(got, y.detach().split(sizes), x.grad.split(sizes)):
                assert g["y"].dtype == dtype and g["dx"].dtype == dtype and g["dweight"].dtype == param_dtype
                assert g["y_channels_last"] and g["dx_channels_last"]
                assert (g["y"].double() - y_ref).abs().max() < tol * y_ref.abs().max()
                assert (g["dx"].double() - dx_ref).abs().max() < tol * dx_ref.abs().max()
                assert g["running_mean"].dtype == param_dtype
                assert (g["running_mean"].double() - ref.running_mean).abs().max() < tol
                assert (g["running_var"].double() - ref.running_var).abs().max() < tol * ref.running_var.max()
            for key, want in (("dweight", ref.weight.grad), ("dbias", ref.bias.grad)):
                total = sum(g[key].double() for g in got)
                assert (total - want).abs().max() < tol * want.abs().max() + 1e-2, key


# -------------------------------------------------------------------------------- subgroups

def _subgroups() -> tuple[torch.Tensor, torch.Tensor]:
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    layer = SyncBatchNorm(3, process_group=groups[rank // 2]).double()
    x = _rank_batch(_case([4, 2, 3, 5], 3, (4,)), rank, 0)[0]
    return layer(x).detach(), layer.running_mean.clone()


def test_statistics_stay_within_the_process_subgroup(pools):
    per_rank = pools(4).run(_subgroups)
    case = _case([4, 2, 3, 5], 3, (4,))
    xs = [_rank_batch(case, r, 0)[0] for r in range(4)]
    for pair in ((0, 1), (2, 3)):
        ref = nn.BatchNorm1d(3).double()
        y = ref(torch.cat([xs[r] for r in pair])).detach().split([xs[r].shape[0] for r in pair])
        for r, y_ref in zip(pair, y):
            assert _max_diff(per_rank[r][0], y_ref) < EXACT
            assert _max_diff(per_rank[r][1], ref.running_mean) < EXACT
    assert _max_diff(per_rank[0][1], per_rank[2][1]) > 1e-3  # the two groups did see different statistics


# ------------------------------------------------------------------- single process, conversion

def test_without_process_group_it_is_torch_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    sync, ref = SyncBatchNorm(3), nn.BatchNorm2d(3)
    assert torch.equal(sync(x), ref(x))
    assert torch.equal(sync.running_var, ref.running_var)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        sync(torch.randn(3))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn2 = nn.BatchNorm2d(3, momentum=None)
        self.block = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4, affine=False))
        self.bn3 = nn.BatchNorm3d(2, track_running_stats=False)

    def forward(self, x):
        return self.block(self.bn2(self.conv(x)))


def test_convert_revert_round_trip_keeps_tensors_and_flags():
    torch.manual_seed(0)
    net = _Net().double()
    net.bn2.weight.requires_grad_(False)
    net.block.eval()
    net(torch.randn(5, 2, 4, 4, dtype=torch.float64))  # non-default running statistics
    original = {name: type(m) for name, m in net.named_modules()}
    tensors = {name: t for name, t in list(net.named_parameters()) + list(net.named_buffers())}
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    expected = copy.deepcopy(net)(x)

    converted = convert_sync_batchnorm(net)
    kinds = {name: type(m) for name, m in converted.named_modules()}
    assert [n for n, k in kinds.items() if k is SyncBatchNorm] == ["bn2", "block.2", "bn3"]
    for name, t in list(converted.named_parameters()) + list(converted.named_buffers()):
        assert t is tensors[name]  # the very same tensors: optimizers keep working
    assert not converted.bn2.weight.requires_grad and not converted.block[2].training and converted.bn2.training
    assert converted.bn3.running_mean is None and converted.block[2].weight is None
    assert converted.bn2.momentum is None and converted.bn2.weight.dtype == torch.float64
    assert torch.equal(converted(x), expected)  # no process group: plain batch norm

    reverted = revert_sync_batchnorm(converted)
    assert {name: type(m) for name, m in reverted.named_modules()} == original
    assert all(reverted.state_dict()[k].equal(v) for k, v in state.items() if k.startswith("conv"))
    assert not reverted.block[2].training and not reverted.bn2.weight.requires_grad
    assert isinstance(revert_sync_batchnorm(SyncBatchNorm(2)), BatchNormXd)
    assert BatchNormXd(2)(torch.randn(3, 2, 2, 2, 2)).shape == (3, 2, 2, 2, 2)


def test_state_dict_interchange_with_torch_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    sync = SyncBatchNorm(3)
    sync.load_state_dict(bn.state_dict(), strict=True)
    back = nn.BatchNorm2d(3)
    back.load_state_dict(sync.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v) and torch.equal(back.state_dict()[k], v), k
    assert int(sync.num_batches_tracked) == 1


# ---------------------------------------------------------------------- benchmark baselines

def _baselines_agree() -> dict:
    from disttrain.bench import syncbn as bench

    rank, out = dist.get_rank(), {}
    for name, make in bench.implementations().items():
        g = torch.Generator().manual_seed(rank)
        x = (2 + torch.randn(3 + rank, 4, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
        layer = make(4).double()
        y = layer(x)
        y.backward(torch.cos(x.detach()))
        out[name] = (y.detach(), x.grad, layer.running_var.clone())
    return out


def test_benchmark_baselines_compute_the_same_as_syncbn(pools):
    for out in pools(2).run(_baselines_agree):
        y0, dx0, var0 = out["disttrain"]
        for name, (y, dx, var) in out.items():
            if name == "local":
                assert _max_diff(y, y0) > 1e-3  # per-rank statistics: differs, as it should
                continue
            assert max(_max_diff(y, y0), _max_diff(dx, dx0), _max_diff(var, var0)) < EXACT, name

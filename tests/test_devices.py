"""Devices: every collective sends tensors of the compute device (checked on the CPU with tests/devicecheck.py),
the device choice for more ranks than GPUs, TF32 and determinism settings, and generators left untouched."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from disttrain.cli.main import main
from disttrain.config import config_from_dict, load_config
from disttrain.errors import ConfigError
from disttrain.models.build import build_model
from disttrain.parallel import env as env_module
from disttrain.parallel.env import choose_device, distributed
from disttrain.run.precision import configure_numerics
from disttrain.run.stop import GracefulStop
from disttrain.run.train import Hook, run
from tests.devicecheck import HostTensors, recording_collectives
from tests.harness import WorkerError

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TINY = ["train.device=cpu", "seed=3", "data.name=synthetic", "data.num_samples=48", "model.name=cnn",
        "model.hidden=8", "model.norm=syncbn", "train.dtype=float64", "train.global_batch_size=12", "train.steps=2",
        "train.log_every=1000", "train.tensorboard=false", "optim.name=adamw", "optim.lr=0.01"]


# --------------------------------------------------------------------------- collectives on the compute device

class SignalAt(Hook):
    """Rank 1 sends itself SIGUSR1 at the end of step ``step``: the stop path, with its handler's write."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, result) -> None:
        if trainer.env.rank == 1 and step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class HostStop(GracefulStop):
    """The stop hook as it was under fsdp: its request made on the host, whatever the compute device, and reduced by
    an all_reduce of its own after the step (the strategy's reduction could not carry it)."""

    def on_start(self, trainer) -> None:
        super().on_start(trainer)
        self.request = torch.zeros(2)
        self._sync.control = None  # not carried by the strategy: reduced below, as the hook did

    def on_step_end(self, trainer, step, result) -> None:
        from disttrain.parallel.collectives import sum_over_ranks

        self._reduced = sum_over_ranks(self.request.clone(), trainer.env).tolist()


def train_recording(cases: list[tuple[dict, bool]], host_stop: bool = False) -> list[list[str]]:
    """Each (config, resume) in turn under the host-tensor check; the names of the collectives each one sent."""
    names = []
    for cfg_dict, resume in cases:
        cfg = config_from_dict(cfg_dict)
        sent: list[tuple[str, tuple[int, ...]]] = []
        stop = HostStop() if host_stop else GracefulStop()
        with distributed("cpu", cfg.comm.timeout_s) as env, recording_collectives(HostTensors(), sent):
            run(cfg, env, console=False, resume=resume, hooks=[SignalAt(1), stop])
        names.append(sorted({name for name, _ in sent}))
    return names


def _case(out_dir: Path, *extra: str) -> dict:
    return load_config(None, [*TINY, f"train.out_dir={out_dir}", *extra]).to_dict()


def test_every_collective_sends_tensors_of_the_compute_device(pools, tmp_path):
    """W=2 runs of ddp (with SyncBN), the explicit all_reduce and fsdp, each with the stop hook and a signal at
    step 1, then ddp's and fsdp's resumed: no collective ever sends a tensor made without the compute device (the
    check of tests/devicecheck.py, which also fails on the stop request as it was; see the next test)."""
    cases = []
    for impl in ("ddp", "allreduce", "fsdp", "fsdp-sharded"):
        # fsdp: the full format (rank 0's whole tensors broadcast on resume); fsdp-sharded: DCP, each rank its own
        sets = [f"comm.impl={impl.split('-')[0]}", "train.checkpoint_every=1",
                f"train.checkpoint_format={'sharded' if impl.endswith('sharded') else 'full'}"]
        cases.append((_case(tmp_path / impl, *sets), False))
        if impl != "allreduce":  # its resume is ddp's (the replicated strategies' load_state_dict)
            cases.append((_case(tmp_path / impl, *sets, "train.steps=3"), True))
    ranks = pools(2).run(train_recording, cases[:5])  # one task per strategy group: each within the pool's timeout
    ddp, ddp_resumed, allreduce, fsdp, fsdp_resumed = ranks[0]
    sharded, sharded_resumed = pools(2).run(train_recording, cases[5:])[0]
    assert "all_reduce" in ddp and "all_gather" in ddp  # the comm hook; SyncBN's statistics
    assert "broadcast" in ddp_resumed  # the checkpoint's state, tensor by tensor
    assert "all_reduce" in allreduce
    assert {"all_gather_single", "reduce_scatter_single", "all_reduce"} <= set(fsdp)  # shards; stop request
    assert "broadcast" in fsdp_resumed
    assert {"all_gather_single", "reduce_scatter_single"} <= set(sharded) and "broadcast" not in sharded_resumed


def test_the_check_fails_on_a_stop_request_made_on_the_host(pools, tmp_path):
    """The fsdp stop path with the request on the host (the fault that broke fsdp on NCCL): refused, one line."""
    case = (_case(tmp_path, "comm.impl=fsdp", "train.checkpoint_every=0"), False)
    message = r"dist.all_reduce sent a host tensor of shape \(2,\) \(made without the compute device at .*test_devices"
    with pytest.raises(WorkerError, match=message):
        pools(2).run(train_recording, [case], True)


def _broadcast_state() -> bool:
    from disttrain.parallel.collectives import broadcast_state_from_main

    state = {"model": {"w": torch.arange(6.0).view(2, 3).t(), "n": torch.tensor(7),
                       "mask": torch.tensor([True, False])},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, dtype=torch.float64)}},
                           "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.999)}]}}
    with distributed("cpu") as env:
        got = broadcast_state_from_main(state if env.is_main else None, env)
    same = got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, want in state["model"].items():
        same &= torch.equal(got["model"][key], want) and got["model"][key].dtype == want.dtype
    ours = got["optimizer"]["state"][0]
    return same and torch.equal(ours["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]) and ours["step"].item() == 3


def test_resume_state_is_broadcast_tensor_by_tensor_whole(pools):
    """Nested dicts, lists, tuples, plain values, and tensors of every dtype (a transposed one too) arrive whole."""
    assert pools(2).run(_broadcast_state) == [True, True]


# --------------------------------------------------------------------------- device choice

@pytest.fixture
def one_gpu(monkeypatch):
    """A machine that shows one CUDA device to the decision function."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_with_more_ranks_than_gpus_runs_on_the_cpu_and_says_so(one_gpu):
    for rank in (0, 1):
        device, note = choose_device("auto", rank, 2)
        assert device == torch.device("cpu")
        assert note == ("train.device=auto: W=2 ranks on this node, 1 CUDA device visible: running on the CPU with "
                        "gloo (one GPU per rank; train.device=cuda makes this an error)")
    assert choose_device("auto", 0, 1) == (torch.device("cuda", 0), None)
    assert env_module.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"


def test_cuda_with_more_ranks_than_gpus_is_a_one_line_error_before_workers_start(one_gpu, tmp_path, capsys):
    with pytest.raises(ConfigError, match="2 ranks on this node but 1 CUDA device visible"):
        choose_device("cuda", 0, 2)
    code = main(["train", str(DEMO), "--nproc", "2", "--set", "train.device=cuda",
                 "--set", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.device=cuda: 2 ranks on this node but 1 CUDA device" in err[0]
    assert not (tmp_path / "launcher.log").exists()  # no worker was started


def test_an_existing_gloo_group_means_the_cpu(pools):
    """The harness's gloo group (and any group without NCCL): device auto is the CPU, even on a CUDA host."""
    assert pools(2).run(_device_in_existing_group) == ["cpu", "cpu"]


def _device_in_existing_group() -> str:
    with distributed("auto") as env:
        return env.device.type


# --------------------------------------------------------------------------- numerics

@pytest.fixture
def restore_numerics():
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.rnn.fp32_precision, torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.rnn.fp32_precision) = saved[:3]
    torch.use_deterministic_algorithms(saved[3])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[4:6]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def _tf32_modes() -> tuple[str, str, str]:
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.rnn.fp32_precision)


def test_tf32_is_off_on_cuda_unless_allowed(restore_numerics):
    cuda = torch.device("cuda", 0)  # only a name here: the flags are process settings, set without a GPU
    configure_numerics(cuda, tf32=False, deterministic=False)
    assert _tf32_modes() == ("ieee", "ieee", "ieee")
    configure_numerics(cuda, tf32=True, deterministic=False)
    assert _tf32_modes() == ("tf32", "tf32", "tf32")
    before = _tf32_modes()
    configure_numerics(torch.device("cpu"), tf32=False, deterministic=False)  # the CPU has no TF32: untouched
    assert _tf32_modes() == before and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_sets_torch_cublas_and_cudnn(restore_numerics, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_numerics(torch.device("cuda", 0), tf32=False, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_tf32_is_a_trajectory_key_with_fp16s_tolerance():
    from disttrain.config.identity import trajectory_differences
    from disttrain.verify.whole import run_tolerance, tolerance

    a = load_config(None, []).to_dict()
    b = load_config(None, ["train.tf32=true", "train.deterministic=true", "comm.force_collectives=true"]).to_dict()
    assert trajectory_differences(a, b) == ["train.tf32"]
    assert tolerance("float32", 1, "fp32", tf32=True) == tolerance("float32", 1, "fp16")
    assert run_tolerance("float32", "fp32", tf32=True) == run_tolerance("float32", "fp16")
    assert run_tolerance("float64", "fp32", tf32=True) == run_tolerance("float64")


def test_model_building_leaves_every_generator_as_it_found_it(monkeypatch):
    """Only the CPU generator is seeded, inside fork_rng: torch.manual_seed (which reseeds every CUDA generator,
    and fork_rng(devices=[]) would not restore them) is never called."""
    cfg = load_config(None, TINY)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed reseeds CUDA generators"))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("reseeds CUDA generators"))
    before = torch.random.get_rng_state()
    a = build_model(cfg.model, (1, 8, 8), 10, 5, torch.float64, torch.device("cpu"))
    b = build_model(cfg.model, (1, 8, 8), 10, 5, torch.float64, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------- on a CUDA device (tools/gpu_check.sh)

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@gpu
def test_float32_on_cuda_is_ieee_unless_tf32_is_allowed(restore_numerics):
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(256, 256, device="cuda", generator=g) for _ in range(2))
    x = torch.randn(8, 16, 32, 32, device="cuda", generator=g)
    w = torch.randn(16, 16, 3, 3, device="cuda", generator=g)
    configure_numerics(torch.device("cuda", 0), tf32=False, deterministic=False)
    mm = relative(a @ b, a.double() @ b.double())
    conv = relative(torch.nn.functional.conv2d(x, w), torch.nn.functional.conv2d(x.double(), w.double()))
    assert mm < 1e-5 and conv < 1e-5  # TF32 (10 mantissa bits) would be ~1e-3


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@gpu
def test_a_group_of_one_on_cuda_runs_every_collective_with_the_stop_hook(tmp_path):
    """An NCCL group of one (beside gloo), fsdp and SyncBN forced past the W=1 shortcut, the stop hook installed:
    its request lives on the GPU and the run completes (NCCL refuses a CPU tensor)."""
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for impl in ("ddp", "allreduce", "fsdp"):
            cfg = load_config(None, [*TINY, "train.device=cuda", f"train.out_dir={tmp_path / impl}",
                                     f"comm.impl={impl}", "comm.force_collectives=true"])
            stop = GracefulStop()
            with distributed("cuda") as env:
                result = run(cfg, env, console=False, hooks=[stop])
            assert stop.request.device.type == "cuda" and stop.signum is None and len(result.losses) == 2
    finally:
        dist.destroy_process_group()

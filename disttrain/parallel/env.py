"""Process-group bootstrap and teardown.

Three situations, one entry point (:func:`distributed`):
- launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): create the group;
- a process group already exists (a user's own launcher, the test harness): use it, do not destroy it;
- no launcher at all: world size 1, no process group, nothing to communicate.

The device comes from LOCAL_RANK (the index of this process on its node), never from RANK (its index
in the whole job): on node 2 of a 2-node job RANK is 8..15 but the GPUs are still cuda:0..7. Each rank needs a GPU
of its own (:func:`choose_device`); on CUDA the group is ``cpu:gloo,cuda:nccl`` (:func:`backend_for`).
"""

from __future__ import annotations

import contextlib
import gc
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError, RunFailure


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: no process group (single process)
    # The line saying train.device=auto fell back to the CPU, on the first rank of each node (None elsewhere): the
    # trainer prints it once the run is built, so that a user error before that stays one line.
    note: str | None = field(default=None, compare=False)

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ



def choose_device(requested: str, local_rank: int, local_world_size: int) -> tuple[torch.device, str | None]:
    """This rank's device for ``train.device=requested``, and a line to print when ``auto`` fell back to the CPU.

    ``local_world_size`` ranks run on this node, each on its own GPU (NCCL cannot put two ranks on one GPU). ``auto``
    takes cuda:LOCAL_RANK when every local rank has a GPU and the CPU (with gloo) otherwise, saying so in one line
    (also when no GPU is visible at all);
    ``cuda`` with too few GPUs is a :class:`ConfigError` (the CLI raises it before any worker starts).
    """
    available = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if available else 0
    if requested == "cuda":
        if not available:
            raise ConfigError("train.device=cuda but CUDA is not available on this machine")
        if local_world_size > gpus or local_rank >= gpus:
            raise ConfigError(f"train.device=cuda: {local_world_size} ranks on this node but {gpus} CUDA "
                              f"device{'s' if gpus != 1 else ''} visible (one GPU per rank; NCCL cannot share one)")
        return torch.device("cuda", local_rank), None
    if requested == "auto" and available:
        if local_world_size <= gpus and local_rank < gpus:
            return torch.device("cuda", local_rank), None
        return torch.device("cpu"), (f"train.device=auto: W={local_world_size} ranks on this node, {gpus} CUDA "
                                     f"device{'s' if gpus != 1 else ''} visible: running on the CPU with gloo "
                                     "(one GPU per rank; train.device=cuda makes this an error)")
    if requested == "auto":
        return torch.device("cpu"), "train.device=auto: no CUDA device visible: running on the CPU with gloo"
    return torch.device("cpu"), None


def resolve_device(requested: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """:func:`choose_device` without its line."""
    return choose_device(requested, local_rank, local_world_size)[0]


def local_world_size(default: int) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun and ``--nproc`` set it), else ``default``."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() else default


def backend_for(device: torch.device) -> str:
    """The process group's backend: NCCL for CUDA tensors with gloo beside it for CPU tensors, so a value left on
    the host by mistake still travels (slowly, through gloo) instead of failing the step; gloo alone on the CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


class PeerFailure(RunFailure):
    """A collective could not complete because another rank died or stopped responding."""


def _peer_failure(exc: RuntimeError, rank: int | str, timeout_s: float) -> PeerFailure | None:
    """Name a failed collective or rendezvous in one line; None if ``exc`` is something else."""
    text = str(exc)
    if "Timed out" in text or "timed out" in text:
        return PeerFailure(f"rank {rank}: no answer from a peer within comm.timeout_s={timeout_s:g} s "
                           "(a peer is dead, stuck, or never started)")
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return PeerFailure(f"rank {rank}: a peer process died (its connection closed)")
    return None


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = 300.0) -> Iterator[DistEnv]:
    """Yield this process's DistEnv; tear down the process group on exit if (and only if) we created it.

    A collective that fails because a peer died or timed out surfaces as :class:`PeerFailure`, one line.
    """
    created = False
    rank = os.environ.get("RANK", "0")
    try:
        with _name_peer_failures(rank, timeout_s):
            env, created = _setup(device, timeout_s)
        with _name_peer_failures(env.rank, timeout_s):
            yield env
    finally:
        if created:  # the one place a process group is destroyed
            # DDP's reducer and its comm-hook futures sit in reference cycles that hold the group; collect them
            # while the interpreter is fully alive, so gloo's threads are not torn down during finalization
            # (a std::terminate, SIGABRT, at exit).
            gc.collect()
            dist.destroy_process_group()


@contextlib.contextmanager
def _name_peer_failures(rank: int | str, timeout_s: float) -> Iterator[None]:
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as exc:
        failure = _peer_failure(exc, rank, timeout_s)
        if failure is None:
            raise
        raise failure from exc


def _elastic_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torch's elastic agent with its shared rendezvous store: the store, under a prefix of its own for
    this incarnation of the worker group ({} otherwise: init_process_group reads MASTER_ADDR/PORT).

    The agent keeps one TCPStore for all rendezvous rounds, and the process group's keys (each rank's gloo
    address) would be those of the previous round: a restarted group then connects to the dead workers'
    addresses and fails. A failure restart increments TORCHELASTIC_RESTART_COUNT, and within one restart
    count membership can only grow (a node that leaves is a failure), so (restart count, world size) names
    each incarnation uniquely.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world, is_master=False,
                          timeout=timeout)
    prefix = f"disttrain/restart{restart_count()}/world{world}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world}



def _setup(requested: str, timeout_s: float) -> tuple[DistEnv, bool]:
    created = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = dist.get_backend()
        if requested == "auto" and "nccl" not in backend:
            requested = "cpu"  # a group without NCCL (the test harness's gloo group) carries CPU tensors
        # Without LOCAL_WORLD_SIZE (a user's own launcher), assume no more ranks on this node than this one needs.
        device, note = choose_device(requested, local_rank, local_world_size(local_rank + 1))
    elif launched_by_torchrun():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise ConfigError(f"incomplete torchrun environment: {', '.join(missing)} not set")
        rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        device, note = choose_device(requested, local_rank, local_world_size(world))
        backend = backend_for(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The timeout bounds every collective: a peer that died makes the others fail after at most
        # timeout_s instead of waiting forever (gloo usually notices a closed socket much sooner).
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                                **_elastic_store(rank, world, timeout))
        created = True
    else:
        rank, world, local_rank, backend = 0, 1, 0, None
        device, note = choose_device(requested, local_rank, 1)
    if device.type == "cuda":  # every path: the current device is this rank's (pin threads, meshes, NCCL)
        torch.cuda.set_device(device)
    env = DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend,
                  note=note if local_rank == 0 else None)  # one line per node
    return env, created


def restart_count() -> int:
    """How many times torch's elastic agent has restarted this worker group (0: the first attempt).

    torchrun and the elastic launcher behind ``--nproc`` set TORCHELASTIC_RESTART_COUNT for every worker;
    a restarted group continues from its newest checkpoint instead of starting over.
    """
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a job's share, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_threads(local_processes: int) -> int:
    """Intra-op threads for one of ``local_processes`` processes sharing this machine's cores: cores / processes, at
    least 1 (the launcher gives each of several workers one, as torchrun does; on 2 cores both rules agree)."""
    return max(1, machine_cores() // max(1, local_processes))


@contextlib.contextmanager
def threads_of_a_worker(local_processes: int) -> Iterator[int]:
    """torch's intra-op threads for a one-process run that stands in for ``local_processes`` ranks (verify's
    reference and twins, step-wise retraining, the demos' one-process runs): what one of those ranks would get,
    restored on exit. Left alone when the user chose: an ``OMP_NUM_THREADS`` (or MKL/TORCH) variable, or a
    ``torch.set_num_threads`` that changed torch's default of one thread per core.

    torch's default runs one OpenMP thread per core, and its threads spin at each parallel region's barrier: on a
    machine busy with other jobs a thread that lost its core keeps the others spinning, and a run slows far beyond its
    share (measured here: verify's one-process runs 13x slower under load with the default, docs/performance.md).
    """
    if any(name in os.environ for name in THREAD_VARIABLES) or torch.get_num_threads() != machine_cores():
        yield torch.get_num_threads()
        return
    previous = torch.get_num_threads()
    threads = worker_threads(local_processes)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)

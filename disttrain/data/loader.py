"""This rank's micro-batches of every step, read from any :class:`~.source.Source`.

Step k's global batch is a pure function of (seed, k) (batching.py); this rank fetches only its contiguous
slice of it, augments each sample from its keys (seed, step, position in the global batch), and cuts the slice
into micro-batches. Nothing carries state from one step to the next, so a run can start at any step (resume
is O(1)) and the samples, their order and their augmentation do not depend on the world size.

With ``data.workers`` W > 0, a torch DataLoader reads ahead: its batch sampler yields the steps [start, stop)
one at a time, and a worker turns step k into this rank's (x, y, positions) by the same arithmetic, fetch and
augmentation as the training process would (:func:`read_step`). Workers are persistent, take steps in turn,
and each has ``data.prefetch`` steps in flight; the DataLoader returns them in step order. What a step holds
therefore does not depend on the number of workers either. On CUDA the batches are pinned and copied without
blocking, read by workers or not, and the samples' positions are made on the device.

Workers are forked on Linux, whatever start method started the rank (:func:`worker_context`): a dataset is
inherited, never pickled, so a user's dataset over a numpy memmap costs its pages read, not its whole file. A
forked worker's queues use semaphores that are unlinked as soon as they exist, so a rank that is killed while a run
fails (the agent ends the others when one rank raises) leaves none behind for the launcher's resource tracker to
report as leaked: a failed run prints its one line only.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError, RunFailure
from ..randomness import SampleKeys
from .augment import augment_images
from .batching import global_batch_indices, local_slice, rank_parts, within_batch_order
from .named import concat
from .source import Source

MicroBatch = tuple[torch.Tensor, torch.Tensor, SampleKeys]
class GlobalBatches:
    """This rank's slice of every step's global batch; ``workers`` > 0: read ahead by DataLoader workers."""

    def __init__(self, dataset: Source, global_batch_size: int, seed: int, rank: int, world_size: int,
                 workers: int = 0, prefetch: int = 2):
        if global_batch_size > len(dataset):
            raise ConfigError(f"train.global_batch_size: {global_batch_size} exceeds the {len(dataset)} samples of "
                              "the dataset; a global batch may not repeat a sample")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.slice = local_slice(global_batch_size, world_size, rank)
        self.workers, self.prefetch = workers, prefetch
        # A one-process run that reads the batch as ``ranks`` ranks would (verify's reference and twins,
        # verify/twin.py): micro-batch j is made of every rank's j-th micro-batch (:func:`split`), so it holds the
        # samples the ranks' micro-batch j holds, their parts in ``rank_order`` (None: rank 0 first).
        self.ranks = 1
        self.rank_order: tuple[int, ...] | None = None
        # None: the samples in their global-batch order. An int: each step's samples reordered within each rank's
        # slice by within_batch_order(order, step, size, ranks), each with its own keys (verify's second twin).
        self.order: int | None = None
        self._loader: DataLoader | None = None

    @property
    def local_batch_size(self) -> int:
        return self.slice.stop - self.slice.start

    def indices(self, step: int) -> np.ndarray:
        return global_batch_indices(step, self.global_batch_size, len(self.dataset), self.seed)[self.slice]

    def keys(self, step: int, device: torch.device | str = "cpu") -> SampleKeys:
        """The samples this rank holds at ``step``: their positions in the global batch, made on ``device`` (the
        model's dropout hashes them there: made on the host, they would be copied there on every call)."""
        return SampleKeys(self.seed, step, torch.arange(self.slice.start, self.slice.stop, device=device))

    def samples(self, step: int, device: torch.device | str = "cpu") -> tuple[np.ndarray, SampleKeys]:
        """The dataset indices and keys (on ``device``) of this rank's samples at ``step``, in the order they are
        read: the global batch's order, or a rounding twin's permutation of it (``order``: verify/twin.py), where
        every sample keeps its own key."""
        indices = self.indices(step)
        return self._reordered(step, indices), self._reordered_keys(step, self.keys(step, device))

    def _reordered(self, step: int, indices: np.ndarray) -> np.ndarray:
        if self.order is None:
            return indices
        return indices[within_batch_order(self.order, step, len(indices), self.ranks)]

    def _reordered_keys(self, step: int, keys: SampleKeys) -> SampleKeys:
        if self.order is None:
            return keys
        order = torch.as_tensor(within_batch_order(self.order, step, len(keys.positions), self.ranks),
                                device=keys.positions.device)
        return SampleKeys(keys.seed, step, keys.positions[order])

    def keyed_batch(self, step: int, device: torch.device) -> MicroBatch:
        """This rank's (x, y) of ``step``, augmented per sample, and the samples' keys (on ``device``)."""
        indices, host_keys = self.samples(step)
        x, y = self.dataset.fetch(indices, host_keys)  # a source's own transforms run on the host
        on_host = torch.device(device).type == "cpu"
        keys = host_keys if on_host else self._reordered_keys(step, self.keys(step, device))
        x = augment_images(to_device(x, device), keys, self.dataset.augment, self.dataset.crop_padding)
        return x, to_device(y, device), keys

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.keyed_batch(step, device)
        return x, y

    def keyed_micro_batches(self, step: int, device: torch.device, k: int) -> list[MicroBatch]:
        """This rank's batch cut into ``k`` micro-batches (:func:`split`), each with its samples' keys."""
        return split(self.keyed_batch(step, device), k, self.ranks, self.rank_order)

    def micro_batches(self, step: int, device: torch.device, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`keyed_micro_batches` without the keys."""
        return [(x, y) for x, y, _ in self.keyed_micro_batches(step, device, k)]

    def steps(self, start: int, stop: int, device: torch.device, k: int) -> Iterator[tuple[int, list[MicroBatch]]]:
        """(step, its micro-batches) for every step in [start, stop), in order: what the training loop consumes."""
        if self.workers == 0 or start >= stop:
            for step in range(start, stop):
                yield step, self.keyed_micro_batches(step, device, k)
            return
        cuda = device.type == "cuda"
        self.close()  # an earlier pass's workers
        self._loader = DataLoader(_Steps(self), batch_sampler=[[step] for step in range(start, stop)],
                                  collate_fn=_only, num_workers=self.workers, prefetch_factor=self.prefetch,
                                  persistent_workers=True, pin_memory=cuda, worker_init_fn=LoaderWorkerInit(),
                                  multiprocessing_context=worker_context())
        for step, read in zip(range(start, stop), self._loader):
            if isinstance(read, _Failed):
                raise read.error  # a worker's one-line error, as the training process would have raised it
            x, y, positions = read
            keys = SampleKeys(self.seed, step, positions.to(device, non_blocking=cuda))  # pinned by the loader
            batch = (x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda), keys)
            yield step, split(batch, k, self.ranks, self.rank_order)

    def close(self) -> None:
        """Stop the loader workers (nothing to do when batches are read in this process). Never raises: a worker
        that died while the run was failing must not hide the run's own error."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            with contextlib.suppress(Exception):
                iterator._shutdown_workers()


def read_step(batches: GlobalBatches, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In a loader worker: this rank's (x, y) of ``step``, augmented on the CPU, and the samples' positions."""
    indices, keys = batches.samples(step)
    x, y = batches.dataset.fetch(indices, keys)
    x = augment_images(x, keys, batches.dataset.augment, batches.dataset.crop_padding)
    return x, y, keys.positions


class _Failed:
    """A user or read error in a worker, carried back as it is (DataLoader would re-raise it with a traceback
    folded into its message)."""

    def __init__(self, error: BaseException):
        self.error = error


class _Steps:
    """The map-style dataset the DataLoader sees: its "index" is a list of one step."""

    def __init__(self, batches: GlobalBatches):
        self.batches = copy.copy(batches)
        self.batches._loader = None  # a worker never holds the loader

    def __getitems__(self, steps: list[int]) -> list:
        try:
            return [read_step(self.batches, steps[0])]
        except (ConfigError, RunFailure) as exc:
            return [_Failed(exc)]

    def __len__(self) -> int:
        return 0


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How loader workers start: fork on Linux, the platform's default elsewhere.

    Ranks started by ``--nproc`` are spawned, and a DataLoader inherits its process's start method, so under
    spawn it pickles the dataset into every worker. A numpy memmap pickles as its whole contents: a user's
    map-style dataset over a 0.9 GB memmap took each rank to 2-3 GB before its worker started. A forked worker
    inherits the dataset (its maps included) and reads only the pages it touches; no user dataset is pickled.

    Forking a rank is safe here although gloo's threads (and, on CUDA, the driver's) are alive: the child has
    only the forking thread, and a worker never touches what those threads own. It runs :func:`read_step`
    (numpy and CPU tensors) and returns CPU tensors; it never calls torch.distributed or CUDA (pinning happens
    in the rank), and it runs one intra-op thread (:class:`LoaderWorkerInit`), so no OpenMP pool is resumed after
    fork. This is torch's own default on Linux, CUDA jobs included. A worker does inherit the rank's gloo
    sockets: if the rank dies, its peers see the connection close once the worker has noticed (DataLoader's
    watchdog, within seconds) or the launcher has ended the group, and comm.timeout_s bounds the wait anyway.
    macOS forks unsafely (system frameworks abort after fork), so elsewhere the default stays and the dataset is
    pickled as before.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def _only(items: list) -> object:
    return items[0]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # run/stop.py stops a run on these


class LoaderWorkerInit:
    """A DataLoader ``worker_init_fn`` for a training rank's loader workers: one intra-op thread (the workers share
    the cores with the ranks), the stop signals left to the rank, then the user's own ``worker_init_fn`` if any.

    A signal to every process of a job (Slurm at a time limit or ``scancel``, ``kill -TERM -PGID``, torchrun's agent
    signalling each worker's process group) reaches the loader workers too. The decision to stop belongs to the rank,
    which stops all ranks at one step with a checkpoint (run/stop.py); a worker that died of the signal instead (torch
    gives its workers a SIGTERM handler that re-raises it) fails its rank's next step, and the run ends without a
    checkpoint. So a worker ignores SIGINT and SIGUSR1, and SIGTERM unless its rank sent it: the rank ends a worker
    that does not leave by itself with SIGTERM (DataLoader's shutdown and multiprocessing's exit both do), and that
    one must still end it. Picklable, for a DataLoader whose workers are spawned.
    """

    def __init__(self, user_init: Callable[[int], None] | None = None):
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        # A forked worker inherits the rank's uncollected garbage, C++ objects among it (a finished run's process
        # group or store, whose destructors join threads that do not exist in the child: std::system_error, abort).
        # Frozen, the child never collects what it inherited: the parent does; its pages also stay shared.
        gc.freeze()
        torch.set_num_threads(1)
        leave_stop_signals_to_parent()
        if self.user_init is not None:
            self.user_init(worker_id)


def leave_stop_signals_to_parent() -> None:
    """In a helper process of a rank: ignore the stop signals, except a SIGTERM from the parent, which ends it.

    Python's handlers do not see who sent a signal, so SIGTERM is blocked and a thread takes it with
    ``sigwaitinfo`` (which says the sender); the threads started later inherit the mask, so none of them gets it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # (not on macOS) ignore what the parent cannot tell apart
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)  # what torch's own handler does for its parent's SIGTERM

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. To a GPU: pinned first and copied without blocking, so the host goes on queueing
    work while the copy runs (a copy from pageable memory waits for it: a stall of the stream every step)."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def split(batch: MicroBatch, k: int, ranks: int = 1, rank_order: tuple[int, ...] | None = None) -> list[MicroBatch]:
    """``batch`` cut into ``k`` contiguous micro-batches, sized like rank slices (b//k, +1 for the first b%k).

    ``ranks`` > 1 (a one-process run reading the global batch as that many ranks would): each rank's slice is cut
    so, and micro-batch j is the ranks' j-th micro-batches one after another, in ``rank_order`` (default: rank 0
    first). Their sizes never grow with the rank (a larger slice's j-th part is never smaller), so rank r's part of
    micro-batch j is again local_batch_size(len, ranks, r) long: batching.rank_parts finds it, and
    verify/chunked.py runs each layer on it alone."""
    x, y, keys = batch
    if ranks == 1 or (k == 1 and rank_order is None):
        return [(x[s], y[s], keys.select(s)) for s in (local_slice(len(y), k, j) for j in range(k))]
    parts = {r: split((x[s], y[s], keys.select(s)), k) for r, s in rank_parts(len(y), ranks)}
    order = rank_order or range(ranks)
    return [(concat([parts[r][j][0] for r in order]), torch.cat([parts[r][j][1] for r in order]),
             SampleKeys(keys.seed, keys.step, torch.cat([parts[r][j][2].positions for r in order])))
            for j in range(k)]


__all__ = ["GlobalBatches", "LoaderWorkerInit", "MicroBatch", "split", "to_device"]

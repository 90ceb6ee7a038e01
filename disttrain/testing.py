"""Prove a training loop of one's own equal to one device: run it in W local processes, compare with W=1.

    from disttrain.testing import assert_equivalent
    def test_my_loop_is_exact():
        assert_equivalent(my_train, 3, steps=4)      # my_train(steps=4) at W=3 against W=1

:func:`run_ranks` starts ``world_size`` fresh processes, each with a gloo process group on loopback already
initialised (rank, world size and LOCAL_RANK also in the environment, as torchrun sets them), one intra-op thread,
and a rendezvous store that this process hosts on a port the OS picks (no port is hard-coded or raced for). The
processes are forked from a forkserver that has imported torch once, so a group costs about a fork, not an
``import torch`` per rank (~3 s each on a small machine). ``fn`` and its arguments are pickled: ``fn`` must be a
module-level function.

A rank that raises ends the call at once: its peers are killed (they may be waiting in a collective the failed
rank never reaches), and the caller gets that rank's exception, with a note naming the rank, the line of user
code that raised and the rank's traceback. A call that outlives ``timeout_s`` kills every rank and raises
TimeoutError. Each rank leads a process group of its own, and the whole group is killed, so nothing a rank
started (loader workers, subprocesses) outlives the call, on success, failure or timeout.

:func:`assert_equivalent` compares the runs with ``disttrain verify``'s measure and verdict (verify/whole.py).
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sysconfig
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

START_TIMEOUT_S = 120.0  # forking W processes and joining the process group, before fn's own timeout starts
EXIT_GRACE_S = 10.0  # for ranks that returned to leave the process group and exit


class RankError(RuntimeError):
    """A rank failed in a way that has no exception of its own to re-raise (it died, or its exception does not
    pickle); the message holds the rank's report."""


# --------------------------------------------------------------------------- in each rank


def _rank_main(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple,
               kwargs: dict, conn: Any) -> None:
    os.setpgid(0, 0)  # a process group of its own: the caller kills it whole, with whatever it started
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share the cores: one intra-op thread each, as torchrun gives them
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        conn.send(("ready", None, None))
        # Pickled here: an unpicklable result (a tensor still in an autograd graph) is this rank's error.
        conn.send(("ok", pickle.dumps(fn(*args, **kwargs)), None))
    except BaseException as exc:  # noqa: BLE001 -- everything goes back to the caller
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 -- an exception that does not survive pickling: the report alone
            payload = None
        conn.send(("err", payload, _report(rank, world_size, exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _report(rank: int, world_size: int, exc: BaseException) -> str:
    """One block: which rank raised what, the line of user code, and the rank's traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    # The user's line: the innermost frame outside Python, the installed packages and disttrain itself.
    library = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], os.path.dirname(os.__file__),
               os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "disttrain" + os.sep)
    user = [f for f in frames if not f.filename.startswith(library)] or frames
    lines = [f"rank {rank} of {world_size} raised {type(exc).__name__}: {exc}"]
    if user:
        f = user[-1]
        lines.append(f"  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}")
    lines.append(f"traceback of rank {rank}:")
    lines += ["  " + line for chunk in traceback.format_list(frames) for line in chunk.rstrip().splitlines()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- in the caller


def _context() -> multiprocessing.context.BaseContext:
    from . import _API

    ctx = multiprocessing.get_context("forkserver")
    # Imported once in the fork server (if it is not running yet), then every rank is a fork of it: torch, DDP,
    # the DataLoader, the public API's modules and torch._dynamo (which DDP imports when it is built: 6-8 s on 2
    # busy cores) cost seconds per process to import, and nothing to fork.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.parallel", "torch.utils.data", "torch._dynamo",
                                *sorted(set(_API.values()))])
    return ctx


def _kill(procs: list) -> None:
    """Kill every rank's process group (the rank and anything it started), then reap the ranks."""
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no group (yet): the rank alone
            if p.is_alive():
                p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=5)


def run_ranks(fn: Callable[..., Any], world_size: int, /, *args: Any, timeout_s: float = 300.0,
              **kwargs: Any) -> list[Any]:
    """``fn(*args, **kwargs)`` in ``world_size`` fresh processes with a gloo group; every rank's return value,
    in rank order. ``timeout_s``: seconds fn may run (also each collective's timeout); ranks still running then
    are killed and TimeoutError is raised."""
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"run_ranks: world_size must be >= 1, got {world_size}")
    if getattr(fn, "__qualname__", "").count("<"):
        raise TypeError(f"run_ranks: fn must be a module-level function (it is sent to fresh processes by "
                        f"reference), got {fn.__qualname__}")
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S + timeout_s))
    procs, conns = [], []
    try:
        for rank in range(world_size):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, name=f"rank{rank}", daemon=True,
                               args=(rank, world_size, store.port, timeout_s, fn, args, kwargs, send))
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(receive)
        results = _collect(procs, conns, timeout_s)
        for p in procs:  # returned: let them leave the group and exit on their own
            p.join(timeout=EXIT_GRACE_S)
        return results
    finally:
        _kill(procs)  # failure, timeout, interrupt; on success only what the ranks left behind
        for c in conns:
            c.close()


def _collect(procs: list, conns: list, timeout_s: float) -> list[Any]:
    world_size = len(procs)
    results: dict[int, Any] = {}
    ready: set[int] = set()
    deadline = time.monotonic() + START_TIMEOUT_S
    open_conns = dict(enumerate(conns))
    while len(results) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waiting = sorted(set(range(world_size)) - set(results))
            phase = "still running" if len(ready) == world_size else "not started"
            raise TimeoutError(f"run_ranks: rank{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))} "
                               f"of {world_size} {phase} after "
                               f"{timeout_s if phase == 'still running' else START_TIMEOUT_S:g} s (waiting in a "
                               "collective that a peer never reaches?); every rank was killed")
        multiprocessing.connection.wait(list(open_conns.values()), timeout=remaining)
        for rank, conn in list(open_conns.items()):
            if not conn.poll():
                continue
            try:
                kind, payload, report = conn.recv()
            except EOFError:  # the rank exited without a result
                procs[rank].join(timeout=5)
                raise RankError(f"rank {rank} of {world_size} exited with code {procs[rank].exitcode} before "
                                "returning") from None
            if kind == "ready":
                ready.add(rank)
                if len(ready) == world_size:
                    deadline = time.monotonic() + timeout_s  # every rank has joined: fn's time starts
            elif kind == "ok":
                results[rank] = pickle.loads(payload)
                del open_conns[rank]
            else:
                raise _rank_exception(payload, report)
    return [results[r] for r in range(world_size)]


def _rank_exception(payload: bytes | None, report: str) -> BaseException:
    """The rank's own exception, with its report as a note; RankError(report) when it cannot be rebuilt."""
    try:
        exc = pickle.loads(payload) if payload is not None else None
    except Exception:  # noqa: BLE001
        exc = None
    if not isinstance(exc, BaseException):
        return RankError(report)
    exc.add_note(report)
    return exc


# --------------------------------------------------------------------------- the comparison


def _outcome(value: Any, world_size: int) -> tuple[Mapping[str, Any], list[float]]:
    """(state_dict, losses) from what fn returned on rank 0."""
    if isinstance(value, Mapping) and "state" in value:
        return value["state"], [float(x) for x in value.get("losses", [])]
    if isinstance(value, Mapping):
        return value, []
    raise TypeError(f"assert_equivalent: fn must return a state_dict or {{'state': ..., 'losses': ...}}; rank 0 of "
                    f"{world_size} returned {type(value).__name__}")


def assert_equivalent(fn: Callable[..., Any], world_size: int, /, *args: Any, reference_world_size: int = 1,
                      rtol: float | None = None, timeout_s: float = 300.0, **kwargs: Any):
    """Run ``fn(*args, **kwargs)`` at ``world_size`` and at ``reference_world_size`` ranks (:func:`run_ranks`)
    and compare rank 0's results the way ``disttrain verify`` does.

    ``fn`` returns a state_dict, or ``{"state": state_dict, "losses": [global loss per step]}``. Every floating
    tensor and the loss curve are compared by their relative difference max|a - b| / max|b|; the tolerance is
    verify's for the state's dtype (float64: 1e-10) unless ``rtol`` is given. Raises AssertionError with verify's
    table (loss per step, worst tensor, tolerance) when they differ; returns the report when they match.
    """
    from .verify.whole import compare_states  # the package's verdict: one measure for verify and for tests

    runs = {}
    for size in (world_size, reference_world_size):
        if size not in runs:
            runs[size] = _outcome(run_ranks(fn, size, *args, timeout_s=timeout_s, **kwargs)[0], size)
    (state, losses), (ref_state, ref_losses) = runs[world_size], runs[reference_world_size]
    report = compare_states(world_size, state, ref_state, losses, ref_losses, rtol=rtol,
                            reference_world_size=reference_world_size)
    report.no_twin = "assert_equivalent runs no rounding twin: the dtype's fixed tolerance, or rtol, decides"
    if not report.equivalent:
        raise AssertionError(f"{fn.__qualname__} at {world_size} ranks does not match {reference_world_size}:\n"
                             + report.table())
    return report


__all__ = ["run_ranks", "assert_equivalent", "RankError", "START_TIMEOUT_S"]

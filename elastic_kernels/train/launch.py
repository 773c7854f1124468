"""``elastic-train --procs N``: the data-parallel worker processes, started without torchrun
(docs/design.md §10).

:func:`launch` starts ``N`` copies of the same command line (``python -m elastic_kernels.train``)
with the environment torchrun would give them (``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``, ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``), so each joins one process group
(:func:`.runner.setup_distributed`: gloo on CPU) and runs the whole pipeline on its share of
every batch and of every evaluation; rank 0 logs, prints and writes the files. The launching
process only waits:

- Ctrl-C / SIGTERM reach it alone (the workers run in their own process group) and are forwarded
  once to every worker, so each finishes its step, the resumable checkpoint is written and the
  workers exit 130 / 143; a second signal is forwarded too (abort without a checkpoint).
- A worker that fails makes the others stop rather than wait forever in a collective: after
  :data:`GRACE_S` they get SIGTERM, after :data:`KILL_S` more SIGKILL.
- On Linux a worker gets SIGTERM when the launching process dies (``PR_SET_PDEATHSIG``).

The exit status is that of the first worker that failed (128 + N for a signal N), else 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

log = logging.getLogger(__name__)

__all__ = ["launch", "free_port", "worker_env", "GRACE_S", "KILL_S"]

GRACE_S = 5.0  # a failed worker's peers get this long to exit by themselves
KILL_S = 10.0  # then this long after SIGTERM before SIGKILL
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    """The environment of worker ``rank`` of ``world``: this process's, plus the rendezvous
    variables torchrun sets, (``threads`` > 0) ``OMP_NUM_THREADS=threads`` and, for ranks > 0
    unless it is set, ``TORCH_CPP_LOG_LEVEL=ERROR`` (torch's C++ warnings once, from rank 0)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    if rank > 0:
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return env


def _die_with_parent_fn():
    """A ``preexec_fn`` that asks the kernel to send SIGTERM when the launcher dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def fn() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return fn


def _status(returncode: int) -> int:
    """A process exit status as a shell reports it (Popen gives -N for a death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def launch(argv: Sequence[str], procs: int, *, threads: int = 1) -> int:
    """Run ``python -m elastic_kernels.train argv`` as ``procs`` ranks of one process group and
    wait for them; returns the exit status (the first failing worker's, else 0)."""
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 2:
        raise ValueError(f"launch: procs must be an int >= 2, got {procs!r}")
    cmd = [sys.executable, "-m", "elastic_kernels.train", *argv]
    port = free_port()
    preexec = _die_with_parent_fn()
    workers: list[subprocess.Popen] = []
    signals: list[int] = []

    def forward(signum, frame) -> None:
        signals.append(signum)
        for p in workers:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(procs):
            if signals:  # interrupted while starting: nothing has trained yet
                break
            workers.append(subprocess.Popen(cmd, env=worker_env(rank, procs, port, threads), process_group=0,
                                            preexec_fn=preexec))
        log.info("started %d worker processes (ranks 0-%d, gloo rendezvous on 127.0.0.1:%d)", len(workers),
                 len(workers) - 1, port)
        if signals:
            _stop(workers)
            return 128 + signals[0]
        return _wait(workers)
    finally:
        _stop(workers)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(workers: list[subprocess.Popen]) -> int:
    first: int | None = None
    failed_at = 0.0
    terminated = killed = False
    while True:
        for rank, p in enumerate(workers):
            if p.poll() is not None and p.returncode != 0 and first is None:
                first, failed_at = _status(p.returncode), time.monotonic()
                others = [r for r, q in enumerate(workers) if q.poll() is None]
                if others:
                    log.warning("worker rank %d exited with status %d; ranks %s get %.0f s to exit before they are "
                                "terminated", rank, first, others, GRACE_S)
        alive = [p for p in workers if p.poll() is None]
        if not alive:
            return 0 if first is None else first
        if first is not None:
            waited = time.monotonic() - failed_at
            if not terminated and waited > GRACE_S:
                terminated = True
                for p in alive:
                    p.terminate()
            elif terminated and not killed and waited > GRACE_S + KILL_S:
                killed = True
                for p in alive:
                    p.kill()
        time.sleep(_POLL_S)


def _stop(workers: list[subprocess.Popen]) -> None:
    """Terminate (then kill) the workers still running and reap them all."""
    alive = [p for p in workers if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + KILL_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

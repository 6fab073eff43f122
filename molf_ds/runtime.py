"""Process-level helpers shared by every multi-rank entry point (molf-train, the examples, the
test and bench workers): `is_main_rank`, the one rank-0 check, and the exit sequence
(`shutdown`, `run_then_exit`; why: docs/design.md, "The exit sequence")."""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable

import torch.distributed as dist

# How long a failing rank lets `destroy_process_group` run: tearing gloo down can wait for work
# still queued against a dead peer, and `os._exit` ends the process either way.
FAILED_DESTROY_WAIT_S = 10.0


def is_main_rank() -> bool:
    """Whether this process is rank 0 (a process without a process group is)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown(code: int) -> None:
    """Leave a multi-rank process without gloo's abort at interpreter exit (docs/design.md,
    "The exit sequence"): barrier → destroy the process group → ``MPI.Finalize()`` if mpi4py
    started MPI → flush → ``os._exit(code)``. Never returns."""
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
                dist.destroy_process_group()
            else:  # a peer may be dead or stopped: never wait on it for more than a moment
                _run_for_at_most(dist.destroy_process_group, FAILED_DESTROY_WAIT_S)
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_for_at_most(work: Callable[[], None], seconds: float) -> None:
    """Run ``work`` in a daemon thread and stop waiting for it after ``seconds``."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)


def run_then_exit(work: Callable[[], None]) -> None:
    """Run this rank's ``work``, print its traceback if it fails, then `shutdown` with 0 or 1."""
    code = 1
    try:
        work()
        code = 0
    except SystemExit as stop:  # `sys.exit(...)` in work: what Python would print and return
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except Exception:
        traceback.print_exc()
    finally:
        shutdown(code)

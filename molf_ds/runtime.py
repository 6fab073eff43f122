"""Process-level helpers shared by every multi-rank entry point (molf-train, test and bench
workers)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def shutdown(code: int) -> None:
    """Leave a multi-rank process without gloo's abort at interpreter exit (docs/design.md,
    "The exit sequence"): barrier → destroy the process group → ``MPI.Finalize()`` if mpi4py
    started MPI → flush → ``os._exit(code)``. Never returns."""
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_then_exit(work: Callable[[], None]) -> None:
    """Run this rank's ``work``, print its traceback if it fails, then `shutdown` with 0 or 1."""
    code = 1
    try:
        work()
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        shutdown(code)

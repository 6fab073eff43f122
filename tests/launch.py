"""Start real multi-rank jobs for the tests: the `deepspeed` launcher with CPU ranks over gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from molf_ds.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"
BIN = Path(sys.executable).parent


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores
    return env


def run_group(
    command: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own; on timeout the whole group is killed.

    A launcher's ranks are its grandchildren: killing only the launcher would leave a hung rank
    spinning on both cores for the rest of the suite.
    """
    with subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(
                f"{' '.join(command)} ran past {timeout} s:\n{(stdout + stderr)[-6000:]}"
            ) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command``; fail the test with the end of its output if it exits non-zero."""
    result = run_group(command, cpu_env(), timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{tail}")
    return result


def deepspeed(ranks: int, script: str, *args: str, timeout: float = 300):
    """``deepspeed --num_gpus RANKS tests/workers/SCRIPT ARGS`` on CPU ranks."""
    command = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return run([*command, str(WORKERS / script), *args], timeout=timeout)


def torchrun(ranks: int, script: str, *args: str, timeout: float = 300):
    """``torchrun --nproc_per_node RANKS tests/workers/SCRIPT ARGS`` on CPU ranks."""
    command = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks)]
    command += ["--master_port", str(free_port())]
    return run([*command, str(WORKERS / script), *args], timeout=timeout)


def python(script: str, *args: str, timeout: float = 300):
    """``python tests/workers/SCRIPT ARGS`` in one plain process."""
    return run([sys.executable, str(WORKERS / script), *args], timeout=timeout)


def run_in_terminal(
    command: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr (what a user at a
    terminal gives it); returns what it wrote there as ``stdout`` (``\\r\\n`` line ends, as a
    terminal's). On timeout its process group is killed."""
    import select
    import time

    controller, terminal = open_terminal()
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)  # the child holds it now: reading gives EIO once the child is gone
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                text = b"".join(chunks).decode(errors="replace")
                raise AssertionError(f"{' '.join(command)} ran past {timeout} s:\n{text[-6000:]}")
            ready, _, _ = select.select([controller], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every holder of the terminal side has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    returncode = proc.wait(timeout=60)
    return subprocess.CompletedProcess(command, returncode, b"".join(chunks).decode(), "")


def open_terminal(columns: int = 120, rows: int = 40) -> tuple[int, int]:
    """``(controller, terminal)`` file descriptors of a new pseudo-terminal of that size (a new
    one is 0 x 0, where a progress bar that fits the width draws nothing)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return controller, terminal


@contextmanager
def one_rank_recipe(config, threads: int | None = None) -> Iterator:
    """A set-up molf-train `Recipe` for ``config`` as the one rank of a job in this process (CPU
    accelerator, its own port), in training mode; cleaned up, the process group destroyed and
    torch's thread count restored afterwards. ``threads``: torch threads meanwhile."""
    import torch
    import torch.distributed as dist

    from molf_ds.train.recipe import Recipe

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "DS_ACCELERATOR": "cpu",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            env.setenv(name, value)
        job = Recipe(config)
        try:
            job.setup()
            job.engine.train()
            yield job
        finally:
            job.cleanup()
            if dist.is_initialized():
                dist.destroy_process_group()
            torch.set_num_threads(saved_threads)

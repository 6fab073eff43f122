"""The job's ranks: the launch environment (deepspeed, torchrun, mpirun, one plain process), the
free port, agreement between ranks (one problem, the stop/skip flags, a mean, a barrier, the
longer-waiting group of the end of the run) and the preemption signals with their exit status
`PREEMPTED_EXIT`.

"Am I rank 0?" is the library's `molf_ds.runtime.is_main_rank` (re-exported here), so that
`molf_ds.zero` and the job ask it the same way.
"""

from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from molf_ds.errors import EveryRankError
from molf_ds.runtime import is_main_rank

__all__ = [
    "PREEMPTED_EXIT",
    "PreemptionSignals",
    "agree",
    "agree_flags",
    "barrier",
    "cuda",
    "ensure_launch_env",
    "free_port",
    "is_main_rank",
    "local_device",
    "mean_over_ranks",
    "share_cpu_cores",
    "wait_group",
]

# Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing: EX_TEMPFAIL ("try again"),
# which slurm/train.sbatch turns into `scontrol requeue`; `resume=auto` then continues.
PREEMPTED_EXIT = 75


def free_port() -> int:
    """A TCP port free on every interface of this host now (the rendezvous port of a job)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def cuda() -> bool:
    """Whether the ranks are GPUs (``DS_ACCELERATOR=cpu`` keeps them on the CPU)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def local_device() -> str:
    """This rank's GPU (the one DeepSpeed's engine will use)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def ensure_launch_env() -> None:
    """Rank variables for every launcher: deepspeed/torchrun set them; under mpirun they come
    from mpi4py (DeepSpeed's own MPI discovery would take the master address from
    ``hostname -I``); a plain process is rank 0 of 1."""
    if not cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK")):
        from mpi4py import MPI  # only under mpirun: the `mpi` extra

        comm = MPI.COMM_WORLD
        master = comm.bcast(_hostname_address() if comm.rank == 0 else None, root=0)
        port = comm.bcast(free_port() if comm.rank == 0 else None, root=0)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).rank
        os.environ.update(
            RANK=str(comm.rank),
            WORLD_SIZE=str(comm.size),
            LOCAL_RANK=str(local),
            MASTER_ADDR=os.environ.get("MASTER_ADDR", master),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
        )
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def share_cpu_cores() -> int | None:
    """Collective on CPU ranks: where several ranks share a host's cores, give each an equal
    share of the threads torch would start alone; returns that count (None: left alone).

    Each process's torch otherwise starts one thread per core, so two ranks on two cores run
    four threads that wait on each other (the main job's profile, docs/performance.md).
    torchrun sets ``OMP_NUM_THREADS=1`` for the same reason; the deepspeed launcher and mpirun
    set nothing. Left alone: an ``OMP_NUM_THREADS`` the user set, GPU ranks (their CPU threads
    are not the step's bottleneck), a rank that shares its cores with no other (one process, or
    ranks bound to cores of their own by Slurm's ``--cpus-per-task`` or numactl), and whatever
    the calling process set itself.
    """
    if cuda() or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = _usable_cores()
    mine = (socket.gethostname(), cores)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    sharing = sum(1 for host, theirs in everyone if host == mine[0] and theirs & cores)
    if sharing == 1:
        return None
    threads = max(1, torch.get_num_threads() // sharing)
    torch.set_num_threads(threads)
    return threads


def _usable_cores() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def _hostname_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def agree(problem: str | None, group: dist.ProcessGroup | None = None) -> None:
    """Collective: every rank calls this at the same point with its own problem (or None); if
    any rank has one, every rank raises `EveryRankError` with the first (by rank). ``group``:
    the process group to agree on (None: the default one)."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem, group=group)
    first = next((p for p in problems if p), None)
    if first is not None:
        raise EveryRankError(first)


def agree_flags(flags: list[bool], device: torch.device | str) -> list[bool]:
    """Collective: each flag true on any rank, the same on every rank, from one all-reduce (MAX)
    and one host read."""
    value = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def mean_over_ranks(value: torch.Tensor) -> float:
    """Collective: the mean of a one-element tensor over the ranks (a host read)."""
    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank, where there is a process group (``group``; None: the default)."""
    if dist.is_initialized():
        dist.barrier(group=group)


def wait_group(timeout_s: float) -> dist.ProcessGroup | None:
    """Collective (every rank, at the same point): a gloo group of every rank whose
    collectives wait up to ``timeout_s`` for a peer; None with one rank or no process group.

    For waits where one rank works alone for long (rank 0's exports and evaluation) while
    every other collective keeps the short default timeout. gloo, whatever the ranks' device:
    a rank blocked in it holds no NCCL collective, which NCCL's watchdog would time out. The
    explicit ``timeout`` wins over the default that `molf_ds.zero.init_distributed` sets for
    groups created later."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


class PreemptionSignals:
    """SIGUSR1 (Slurm's ``--signal`` warning before the time limit) and SIGTERM (``scancel``,
    ``scontrol requeue``, preemption) only set a flag during the loop; the loop checkpoints at the
    next step boundary. Repeats change nothing; a run that hangs is still ended by the SIGKILL
    Slurm sends ``KillWait`` seconds after SIGTERM."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

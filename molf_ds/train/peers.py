"""Naming the rank that left a collective waiting: dead, stopped, or just silent.

When a peer rank dies (``kill -9``, the OOM killer) or hangs (``kill -STOP``, a stuck driver),
the other ranks' next collective raises: at once on a closed connection, or after
``collective_timeout_s`` on a silent peer. The error torch raises names a socket address, not a
rank. At set-up every rank learns each peer's host and PID (`gather_peers`, one all-gather);
after a failure a rank looks up the peers on its own host in ``/proc`` and names the one that
exited or is stopped. A peer on another host, or one that hangs while running, is reported as
"a peer rank stopped responding".
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

# How long a failing rank keeps looking for a peer that is dying (see `_settled_states`).
SETTLE_S = 3.0
RESTART_HINT = "restart the job (resume=auto continues from the newest checkpoint)"
# How a collective reports a lost peer: gloo's transport errors, NCCL's watchdog.
_TIMEOUT_TEXT = ("Timed out waiting",)
_CLOSED_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int


def gather_peers() -> tuple[Peer, ...]:
    """Every rank's host and PID, indexed by rank (a collective: every rank calls it)."""
    import torch.distributed as dist

    mine = (socket.gethostname(), os.getpid())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return (Peer(0, *mine),)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return tuple(Peer(rank, host, pid) for rank, (host, pid) in enumerate(gathered))


def process_state(pid: int) -> str:
    """``"exited"``, ``"stopped"`` or ``"running"`` for a process on this host (Linux
    ``/proc``; elsewhere every process reads as running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "exited"
    except OSError:
        return "running"
    state = stat.rpartition(")")[2].split()[0]  # the name in parentheses may hold spaces
    if state in ("Z", "X"):  # a zombie: dead, not yet reaped by its launcher
        return "exited"
    if state in ("T", "t"):
        return "stopped"
    return "running"


def describe_lost_peer(
    err: BaseException,
    peers: tuple[Peer, ...],
    rank: int,
    timeout_s: float,
    timeout_key: str = "collective_timeout_s",
) -> str | None:
    """One line naming the dead or stopped peer behind ``err``; None if ``err`` does not come
    from a lost peer (then it is a bug of its own and keeps its traceback). ``timeout_key`` names
    the option whose ``timeout_s`` the failed collective waited under."""
    host = socket.gethostname()
    local = [peer for peer in peers if peer.rank != rank and peer.host == host]
    states = _settled_states(local)
    # A stopped peer first: a rank that already gave up on it has exited too, and would
    # otherwise be blamed. Several exited peers cannot be told apart: all are named.
    stopped = [peer for peer in local if states[peer] == "stopped"]
    if stopped:
        return (
            f"{_names(stopped)} stopped (SIGSTOP) and did not answer a collective within "
            f"{timeout_key}={timeout_s:g}s: {RESTART_HINT}"
        )
    exited = [peer for peer in local if states[peer] == "exited"]
    if exited:
        return (
            f"{_names(exited)} gone (killed, out of memory, or failed), so rank {rank} cannot "
            f"go on: find why in the log above, then {RESTART_HINT}"
        )
    first_line = (str(err).strip().splitlines() or [""])[0]
    text = _SOURCE_PREFIX.sub("", first_line).split(". ")[0]  # gloo adds advice and emoji
    if any(marker in text for marker in _CLOSED_TEXT):
        return f"a peer rank closed its connection ({text}): it died; {RESTART_HINT}"
    if _is_distributed_error(err) or any(marker in text for marker in _TIMEOUT_TEXT):
        return (
            f"a peer rank stopped responding within {timeout_key}={timeout_s:g}s "
            f"({text}): find the hung or dead rank in the log, then {RESTART_HINT}"
        )
    return None


def _settled_states(local: list[Peer]) -> dict[Peer, str]:
    """Each local peer's state, looked at again for up to `SETTLE_S` while all run: a peer
    killed by SIGKILL closes its sockets before the kernel marks it dead, so the connection
    error can arrive while ``/proc`` still shows it running."""
    deadline = time.monotonic() + SETTLE_S
    while local:
        states = {peer: process_state(peer.pid) for peer in local}
        if any(state != "running" for state in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)
    return {}


def _names(lost: list[Peer]) -> str:
    """``rank 1 (pid 42)``, or ``rank 1 (pid 42) and rank 2 (pid 43)``."""
    names = [f"rank {peer.rank} (pid {peer.pid})" for peer in lost]
    return " and ".join(names) + (" is" if len(names) == 1 else " are")


def _is_distributed_error(err: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(err, dist.DistError)

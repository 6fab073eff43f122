"""A dead or hung rank ends the whole job: non-zero exit, one line naming the rank, no process
left behind, within ``collective_timeout_s`` plus the launcher's own grace; but rank 0's work at
the end of the run (exports, evaluation), which the others wait for, has ``finish_timeout_s``.

Real jobs: molf-train under the deepspeed launcher on 2 and 3 CPU ranks over gloo; once training
is under way (metrics.jsonl has lines) one rank gets ``kill -9`` (dead) or ``kill -STOP`` (hung:
alive, silent, holding its sockets open). A slow end of the run is rank 0 stopped during its
exports for longer than ``collective_timeout_s``, then continued (``kill -CONT``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from molf_ds.train.peers import Peer, describe_lost_peer, process_state
from tests.launch import REPO, cpu_env, free_port

TIMEOUT_S = 15  # collective_timeout_s of these runs
# The bound: the job is gone within a minute plus the timeout after the strike. (The
# deepspeed launcher SIGTERMs the ranks left and waits up to 30 s before it SIGKILLs a stopped
# one, which ignores SIGTERM.)
EXIT_BOUND_S = 60 + TIMEOUT_S
START_LIMIT_S = 300  # until training is under way; 2 cores shared with other jobs
SLOW_END_S = TIMEOUT_S + 10  # how long rank 0 is held during its exports: past the timeout
STRIKES = [  # (signal, ranks, victim): rank 0 (store host, metrics writer) and another rank
    pytest.param(signal.SIGKILL, 2, 1, id="kill9-1of2"),
    pytest.param(signal.SIGKILL, 3, 0, id="kill9-0of3"),
    pytest.param(signal.SIGSTOP, 2, 0, id="stop-0of2"),
    pytest.param(signal.SIGSTOP, 3, 2, id="stop-2of3"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "ranks", "victim"), STRIKES)
def test_dead_or_hung_rank_ends_the_job(tmp_path: Path, sig, ranks: int, victim: int) -> None:
    out, log = tmp_path / "run", tmp_path / "job.log"
    launcher = _start_job(out, log, ranks)
    pids: dict[int, int] = {}
    try:
        pids = _wait_until_training(launcher, out, log, ranks)
        struck = time.monotonic()
        os.kill(pids[victim], sig)
        try:
            launcher.wait(timeout=EXIT_BOUND_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"job still running {EXIT_BOUND_S + 60} s after the strike:\n{_tail(log)}")
        took = time.monotonic() - struck
        print(f"{ranks} ranks, signal {sig.name} to rank {victim}: job ended in {took:.1f} s")
        text = log.read_text(errors="replace")
        assert launcher.returncode != 0, _tail(log)
        assert took <= EXIT_BOUND_S, f"job ended {took:.0f} s after the strike\n{_tail(log)}"
        errors = [ln for ln in text.replace("\r", "\n").splitlines() if "molf-train: error" in ln]
        assert errors, f"no error line\n{_tail(log)}"
        assert all(f"rank {victim} (pid {pids[victim]})" in line for line in errors), errors
        assert "Traceback" not in text, _tail(log)
        assert not _left_behind(launcher.pid, pids.values()), "processes left behind"
    finally:
        _kill_everything(launcher.pid, pids.values())


@pytest.mark.slow
def test_rank_0_end_of_run_longer_than_the_collective_timeout_does_not_fail(tmp_path: Path) -> None:
    """The other ranks wait for rank 0's exports and evaluation under ``finish_timeout_s``, not
    ``collective_timeout_s``: rank 0 held SLOW_END_S (> the timeout) during its exports, then
    continued, ends the job with exit 0 and a summary saying the end took that long. (With one
    timeout for every collective, rank 1 gave up on rank 0 after TIMEOUT_S.)"""
    out, log = tmp_path / "run", tmp_path / "job.log"
    launcher = _start_job(out, log, 2, "max_steps=2", "finish_timeout_s=600")
    pids: dict[int, int] = {}
    try:
        pids = _rank_pids(launcher, 2)
        _wait_for(lambda: (out / "merged").exists() or launcher.poll() is not None, START_LIMIT_S)
        assert launcher.poll() is None, f"job ended before the exports:\n{_tail(log)}"
        os.kill(pids[0], signal.SIGSTOP)  # rank 0 is exporting; rank 1 waits in finish
        time.sleep(SLOW_END_S)
        os.kill(pids[0], signal.SIGCONT)
        launcher.wait(timeout=START_LIMIT_S)
        assert launcher.returncode == 0, _tail(log)
        took = re.search(r"exports and eval (\d+) s", log.read_text(errors="replace"))
        assert took is not None, _tail(log)
        assert int(took.group(1)) > TIMEOUT_S, took.group(0)  # the end outlasted the timeout
    finally:
        _kill_everything(launcher.pid, pids.values())


def test_lost_peer_on_another_host_is_reported_by_the_timeout() -> None:
    elsewhere = (Peer(0, "this-host-does-not-exist", 1), Peer(1, "nor-this-one", 1))
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
        "Timed out waiting 15000ms for recv operation to complete"
    )
    line = describe_lost_peer(gloo, elsewhere, rank=0, timeout_s=15)
    assert line is not None and "stopped responding within collective_timeout_s=15s" in line
    assert "unbound_buffer.cc" not in line
    closed = RuntimeError("[pair.cc:534] Connection closed by peer [10.0.0.2]:4242")
    assert "closed its connection" in describe_lost_peer(closed, elsewhere, 0, 15)
    assert describe_lost_peer(ValueError("a bug"), elsewhere, 0, 15) is None  # keeps traceback


@pytest.mark.slow
def test_process_state_sees_stopped_and_exited_processes() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert process_state(child.pid) == "running"
        os.kill(child.pid, signal.SIGSTOP)
        _wait_for(lambda: process_state(child.pid) == "stopped")
        child.kill()
        _wait_for(lambda: process_state(child.pid) == "exited")  # a zombie: not yet reaped
        child.wait()
        assert process_state(child.pid) == "exited"
    finally:
        child.kill()
        child.wait()


# ---- helpers ----------------------------------------------------------------------------------
def _start_job(out: Path, log: Path, ranks: int, *extra: str) -> subprocess.Popen:
    """The job in the background, its output in ``log``; ``extra`` overrides win."""
    env = cpu_env()
    env.update(PYTHON=sys.executable, NUM_GPUS=str(ranks), MASTER_PORT=str(free_port()))
    args = [
        f"output_dir={out}",
        "max_steps=100000",  # still training whenever the strike comes
        "micro_batch_size=1",
        "log_every=1",
        "warmup_steps=0",
        f"collective_timeout_s={TIMEOUT_S}",
        *extra,
    ]
    with log.open("w") as sink:  # a file, not a pipe: nobody has to drain it
        return subprocess.Popen(
            ["bash", str(REPO / "launch" / "deepspeed.sh"), *args],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the launcher's session holds every rank
        )


def _wait_until_training(
    launcher: subprocess.Popen, out: Path, log: Path, ranks: int
) -> dict[int, int]:
    """``{rank: pid}`` once metrics.jsonl has two steps."""
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + START_LIMIT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if launcher.poll() is not None:
            pytest.fail(f"job ended before training got under way:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no training step within {START_LIMIT_S} s:\n{_tail(log)}")
        time.sleep(0.5)
    return _rank_pids(launcher, ranks)


def _rank_pids(launcher: subprocess.Popen, ranks: int) -> dict[int, int]:
    """``{rank: pid}`` of the job's rank processes, once all have started."""
    pids: dict[int, int] = {}
    deadline = time.monotonic() + START_LIMIT_S
    while sorted(pids) != list(range(ranks)) and time.monotonic() < deadline:
        for proc in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "molf_ds.train" in proc.cmdline() and "RANK" in proc.environ():
                    pids[int(proc.environ()["RANK"])] = proc.pid
        time.sleep(0.2)
    assert sorted(pids) == list(range(ranks)), pids
    return pids


def _left_behind(session: int, rank_pids) -> list[int]:
    """Live processes of the job's session, and rank processes wherever they went."""
    left = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            ours = proc.pid in rank_pids or os.getsid(proc.pid) == session
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                left.add(proc.pid)
    return sorted(left)


def _kill_everything(session: int, rank_pids) -> None:
    """Whatever the outcome, nothing of this job may run on into the rest of the suite."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signal.SIGKILL)
    for pid in rank_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(condition, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace").replace("\r", "\n")[-4000:]

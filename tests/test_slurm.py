"""The Slurm templates on a real Slurm: two nodes (two slurmd daemons on this machine).

Every job is submitted with `sbatch --wait` from the repository root, as a user would. Expected
values come from the same job run another way: a 2-node x 2-rank Slurm job must end with the
deepspeed launcher's final parameters on 4 ranks, and a job requeued twice mid-run (once by
`scontrol requeue`, once by the SIGUSR1 warning `--signal` sends) with the same parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, cpu_env, free_port, run_group
from tests.slurm_cluster import SlurmCluster, unusable
from tests.test_train import SMALL, _assert_same_weights

pytestmark = pytest.mark.slow  # a real Slurm cluster and multi-rank jobs

# 20 steps, a checkpoint every 2: long enough for the requeue test to interrupt it twice.
JOB = [*SMALL, "max_steps=20", "save_every=2"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    problem = unusable()
    if problem:  # one line saying what to install, not a traceback from inside the fixture
        pytest.fail(problem, pytrace=False)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def _env(cluster: SlurmCluster) -> dict[str, str]:
    # Jobs inherit the submitter's environment: the interpreter is named explicitly.
    return {**cpu_env(), "SLURM_CONF": str(cluster.conf), "MOLF_PYTHON": sys.executable}


def _sbatch(cluster, log_dir: Path, script: str, options: list[str], args: list[str], **env):
    """Submit ``slurm/SCRIPT``; returns (the finished sbatch, its log text)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "sbatch",
        "--wait",
        "--parsable",
        f"--output={log_dir}/job-%j.out",
        *options,
        f"slurm/{script}",
        *args,
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**_env(cluster), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, _logs(log_dir)


def _logs(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.out")))


def _ok(result, log: str, cluster) -> None:
    assert result.returncode == 0, f"{result.stderr}\n{log[-4000:]}\n{cluster.logs()[-3000:]}"


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> Path:
    """The reference: the same job through the deepspeed launcher on 4 ranks, one node."""
    out = tmp_path_factory.mktemp("deepspeed") / "run"
    env = {**cpu_env(), "PYTHON": sys.executable, "NUM_GPUS": "4", "MASTER_PORT": str(free_port())}
    result = run_group(
        ["bash", str(REPO / "launch" / "deepspeed.sh"), f"output_dir={out}", *JOB], env, 400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_slurm_two_nodes_match_deepspeed_launcher(cluster, tmp_path, deepspeed_run) -> None:
    out = tmp_path / "run"
    result, log = _sbatch(
        cluster, tmp_path / "logs", "train.sbatch", TWO_NODES, [f"output_dir={out}", *JOB]
    )
    _ok(result, log, cluster)
    assert "on n[1-2]: 4 ranks, rendezvous 127.0.0.1:" in log
    assert json.loads((out / "outputs.json").read_text())["eval_examples"] == 2
    _assert_same_weights(out, deepspeed_run)


def _wait_for(predicate, what: str, job: str, cluster, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (job {job})\n{cluster.logs()}")
        time.sleep(0.05)


def test_slurm_requeued_job_resumes_and_ends_like_a_straight_run(
    cluster, tmp_path, deepspeed_run
) -> None:
    """Interrupted twice — `scontrol requeue` (SIGTERM to every rank) and the SIGUSR1 that
    `--signal=USR1@N` sends before a time limit (the template requeues itself) — and resumed
    from its checkpoints each time: same final parameters as the uninterrupted run."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    command = [
        "sbatch",
        "--wait",
        "--parsable",
        f"--output={logs}/job-%j.out",
        *TWO_NODES,
        "slurm/train.sbatch",
        f"output_dir={out}",
        *JOB,
    ]
    submitted = subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = out / "checkpoints" / "latest"
    _wait_for(latest.exists, "the first checkpoint", "?", cluster)
    job = cluster.run("squeue", "-h", "-o", "%i").stdout.split()[0]
    requeue = cluster.run("scontrol", "requeue", job)
    assert requeue.returncode == 0, requeue.stderr

    def resumed_and_saved() -> bool:
        text = _logs(logs)
        if "resumed from" not in text or not latest.exists():
            return False
        resumed = int(text.split("resumed from")[1].split("at step ")[1].split()[0])
        return int(latest.read_text().removeprefix("step")) > resumed

    _wait_for(resumed_and_saved, "a checkpoint after the first resume", job, cluster)
    warned = cluster.run("scancel", "--signal=USR1", job)
    assert warned.returncode == 0, warned.stderr
    stdout, stderr = submitted.communicate(timeout=300)
    log = _logs(logs)
    assert submitted.returncode == 0, f"{stderr}\n{log[-6000:]}\n{cluster.logs()[-3000:]}"
    assert log.count("molf-train: preempted: checkpoint saved at step") == 2, log[-6000:]
    assert log.count("resumed from") == 2 and "(restart 2)" in log, log[-6000:]
    assert "molf-train: requeueing job" in log
    _assert_same_weights(out, deepspeed_run)


def test_slurm_fsdp2_two_nodes_end_like_deepspeed(cluster, tmp_path, deepspeed_run) -> None:
    """engine=fsdp2 on 2 nodes x 2 ranks through the same template (srun, no launcher; DCP
    checkpoints every 2 steps): every step routes as the deepspeed launcher's ZeRO-2 run on 4
    ranks does, and the final weights agree within fp32 summation order. (Preemption and
    requeue go through the same recipe and template for both engines: the test above; a stop
    and resume=auto under fsdp2: tests/test_train.py.)"""
    from tests.test_train import _weights

    out = tmp_path / "run"
    args = [f"output_dir={out}", *JOB, "engine=fsdp2"]
    result, log = _sbatch(cluster, tmp_path / "logs", "train.sbatch", TWO_NODES, args)
    _ok(result, log, cluster)
    assert "molf-train: done: molf, 20 steps, 4 ranks, FSDP2: training " in log
    routing = [
        [
            json.loads(line)["winners"]
            for line in (run / "routing.jsonl").read_text().splitlines()[1:]
        ]
        for run in (out, deepspeed_run)
    ]
    assert routing[0] == routing[1]
    expected_weights, weights = _weights(deepspeed_run), _weights(out)
    for name, expected in expected_weights.items():  # see test_train.py's FSDP2 run
        assert (weights[name] - expected).abs().max() <= 5e-4 * expected.abs().max(), name


def test_slurm_sweep_array_and_gather_table(cluster, tmp_path) -> None:
    sweep_dir = tmp_path / "sweep"
    result, log = _sbatch(
        cluster,
        tmp_path / "logs",
        "sweep.sbatch",
        ["--array=0-2"],
        [*SMALL, "max_steps=2", "eval_examples=1"],
        SWEEP_MODES="molf lora fft",
        SWEEP_LRS="3e-3",
        SWEEP_SEEDS="1",
        SWEEP_DIR=str(sweep_dir),
    )
    _ok(result, log, cluster)
    names = sorted(p.name for p in sweep_dir.iterdir())
    assert names == ["fft-lr3e-3-seed1", "lora-lr3e-3-seed1", "molf-lr3e-3-seed1"]
    table = subprocess.run(
        [sys.executable, "-m", "molf_ds.train.sweep", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert table[0].split() == [
        "run",
        "mode",
        "task",
        "lr",
        "seed",
        "steps",
        "final_loss",
        "eval_loss",
        "exact_match",
    ]
    rows = [line.split() for line in table[1:]]
    assert [row[1:6] for row in rows] == [
        ["fft", "sql", "0.003", "1", "2"],
        ["lora", "sql", "0.003", "1", "2"],
        ["molf", "sql", "0.003", "1", "2"],
    ]
    for row in rows:
        float(row[6]), float(row[7]), float(row[8])  # every number present


def test_slurm_failed_training_fails_the_job(cluster, tmp_path) -> None:
    result, log = _sbatch(
        cluster,
        tmp_path / "logs",
        "train.sbatch",
        [],
        [f"output_dir={tmp_path / 'run'}", "mode=nope"],
    )
    assert result.returncode != 0, log
    assert "molf-train: error: unknown `mode`" in log
    assert "requeueing" not in log

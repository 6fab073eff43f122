"""The job's rank helpers (molf_ds/train/distributed.py): CPU ranks on one host share its cores
instead of each starting a thread per core (on real processes); a process alone keeps its own."""

from __future__ import annotations

import re

import pytest
import torch

from molf_ds.train.distributed import free_port, share_cpu_cores
from tests import launch


@pytest.mark.slow
def test_two_ranks_on_one_host_split_its_cores_as_torch_threads():
    env = launch.cpu_env()
    env.pop("OMP_NUM_THREADS")  # the deepspeed launcher sets none: the job must choose
    command = [str(launch.BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    result = launch.run_group([*command, str(launch.WORKERS / "share_cores.py")], env, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ranks = re.findall(r"rank (\d) default (\d+) threads (\d+) torch (\d+)", result.stdout)
    assert sorted(r[0] for r in ranks) == ["0", "1"], result.stdout
    for _, default, threads, torch_threads in ranks:
        assert int(threads) == int(torch_threads) == max(1, int(default) // 2)


def test_a_rank_alone_on_its_host_keeps_its_threads(monkeypatch):
    """One process (or ranks bound to cores of their own) shares no core: its thread count,
    torch's default or what the caller set (the study sets one per worker), is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert share_cpu_cores() is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_omp_num_threads_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    assert share_cpu_cores() is None
    assert torch.get_num_threads() == before

"""FSDP2 checkpoints, exports and memory, on real CPU ranks (torchrun, gloo).

Three launches share the work (`runs`): 2 ranks train straight and save; 3 ranks save and resume
the 2-rank save; 2 ranks resume both saves. Each save and resume is the user's own
``torch.distributed.checkpoint`` code (``get_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_state_dict``, `tests/workers/fsdp2_checkpoint.py`). The first launch also trains a tiny
Qwen2 under ``fully_shard`` and exports it (`tests/workers/fsdp2_export.py`); a process that
never imports molf_ds reloads the export.
"""

from __future__ import annotations

import pytest
import torch

from molf_ds.memory import MOMENT_BYTES, fsdp2_shard_numel
from tests import launch

pytestmark = pytest.mark.slow  # real multi-rank jobs

CASES = ("molf", "efficient")
RTOL = 1e-6  # of each tensor's largest magnitude: fp32 summation order across 2 or 3 shards
RESUMES = [("c2", 3), ("c3", 2), ("c2", 2)]  # (the save's directory, ranks that resume it)


def _load(directory, name: str) -> dict:
    return torch.load(directory / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_library")
    out, c2, c3 = root / "out", root / "c2", root / "c3"
    worker = "fsdp2_checkpoint.py"
    launch.torchrun(2, worker, "--out", str(out), "--straight", "--save", str(c2))
    launch.torchrun(3, worker, "--out", str(out), "--save", str(c3), "--resume", str(c2))
    launch.torchrun(2, worker, "--out", str(out), "--resume", str(c3), "--resume", str(c2))
    return out


def _assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((got - expected).abs().max() / scale) <= RTOL, what


@pytest.mark.parametrize("save, ranks", RESUMES, ids=["2to3", "3to2", "2to2"])
@pytest.mark.parametrize("case", CASES)
def test_dcp_resume_equals_the_straight_run(runs, case: str, save: str, ranks: int) -> None:
    """Saved after 2 of 4 steps on N ranks, loaded on M: the last 2 steps pick the straight
    run's winners on every rank, and parameters, both moments of every expert and step counts
    end where the straight run's end."""
    straight = _load(runs, f"{case}_straight")
    resumed = _load(runs, f"{case}_{save}_to{ranks}")
    assert resumed["world"] == ranks
    assert resumed["last_routing"] is None, "the loaded optimizer reports a step it never took"
    after_save = straight["winners"][0][2:]
    for rank, winners in enumerate(resumed["winners"]):
        assert winners == after_save, f"rank {rank} of {ranks} routed otherwise after the resume"
    for step, (got, expected) in enumerate(
        zip(resumed["scores"], straight["scores"][2:], strict=True)
    ):
        finite = expected.isfinite()
        assert torch.equal(got.isfinite(), finite)
        _assert_close(got[finite], expected[finite], f"scores of step {step + 2}")
    assert set(resumed["params"]) == set(straight["params"])
    for name, param in straight["params"].items():
        _assert_close(resumed["params"][name], param, name)
    assert set(resumed["moments"]) == set(straight["moments"])
    for name, state in straight["moments"].items():
        assert resumed["moments"][name]["step"] == state["step"] == 4, name
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_close(resumed["moments"][name][key], state[key], f"{name} {key}")


def test_dcp_runs_route_both_ways(runs) -> None:
    """The comparison above means something only if the steps after the resume route both
    ways: FFT and LoRA winners under MoLF, both LoRA experts under MoLF-Efficient."""
    molf = torch.tensor(_load(runs, "molf_straight")["winners"][0][2:])
    assert molf[..., 0].any() and molf[..., 1].any()
    efficient = torch.tensor(_load(runs, "efficient_straight")["winners"][0][2:])
    assert efficient[..., 1].any() and efficient[..., 2].any()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_optimizer_state_is_sharded_one_nth_per_rank(runs, case: str, ranks: int) -> None:
    """Each rank holds its own shards of the moments, nothing twice: the ranks' bytes add up to
    one process's, the first rank holds what `fsdp2_shard_numel` says (dim 0 split in chunks of
    ``ceil(rows / N)``), and no rank more."""
    memory = _load(runs, f"{case}_memory{ranks}")
    one_process = MOMENT_BYTES * sum(_numel(shape) for shape in memory["trainable_shapes"])
    per_rank = [entry["state"] for entry in memory["per_rank"]]
    assert sum(per_rank) == one_process
    largest = MOMENT_BYTES * sum(fsdp2_shard_numel(s, ranks) for s in memory["trainable_shapes"])
    assert per_rank[0] == largest
    assert max(per_rank) == largest


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out

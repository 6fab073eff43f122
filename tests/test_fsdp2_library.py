"""FSDP2 checkpoints, exports and memory, on real CPU ranks (torchrun, gloo).

Three launches share the work (`runs`): 2 ranks train straight and save; 3 ranks save and resume
the 2-rank save; 2 ranks resume both saves. Each save and resume is the user's own
``torch.distributed.checkpoint`` code (``get_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_state_dict``, `tests/workers/fsdp2_checkpoint.py`). The first launch also trains a tiny
Qwen2 under ``fully_shard`` and exports it (`tests/workers/fsdp2_export.py`); a process that
never imports molf_ds reloads the export.
"""

from __future__ import annotations

import json

import pytest
import torch

from molf_ds.memory import MOMENT_BYTES, estimate_memory, fsdp2_shard_numel
from tests import launch
from tests.workers.fsdp2_export import QWEN2, RANKS

pytestmark = pytest.mark.slow  # real multi-rank jobs

CASES = ("molf", "efficient")
RTOL = 1e-6  # of each tensor's largest magnitude: fp32 summation order across 2 or 3 shards
RESUMES = [("c2", 3), ("c3", 2), ("c2", 2)]  # (the save's directory, ranks that resume it)
LOGITS_ATOL = 1e-5  # fp32 logits of the FSDP2 model against its export reloaded


def _load(directory, name: str) -> dict:
    return torch.load(directory / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_library")
    out, c2, c3, export = root / "out", root / "c2", root / "c3", root / "export"
    worker = "fsdp2_checkpoint.py"
    first = ["--straight", "--save", str(c2), "--export", str(export)]
    launch.torchrun(2, worker, "--out", str(out), *first)
    launch.torchrun(3, worker, "--out", str(out), "--save", str(c3), "--resume", str(c2))
    launch.torchrun(2, worker, "--out", str(out), "--resume", str(c3), "--resume", str(c2))
    return out


@pytest.fixture(scope="module")
def exported(runs):
    """What the 2-rank launch exported, and its reload by transformers and PEFT alone: the MoLF
    model merged, the MoLF-Efficient model as an adapter on its saved base."""
    export = runs.parent / "export"
    reload = export / "reload.pt"
    adapter = ("--adapter", str(export / "adapter"))
    launch.python(
        "hf_reload.py", str(export / "molf_merged"), str(export / "probe.pt"), str(reload), *adapter
    )
    return {"dir": export, "trained": _load(export, "export"), "reloaded": _load(export, "reload")}


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
    """The winners compared above mean something only if the steps after the resume route both
    ways: FFT and LoRA winners under MoLF. (Under MoLF-Efficient here the rank-2 expert wins
    every step; that case is there for its empty shard on the third rank and its frozen base.)"""
    molf = torch.tensor(_load(runs, "molf_straight")["winners"][0][2:])
    assert molf[..., 0].any() and molf[..., 1].any()


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


def test_fsdp2_exports_reload_without_molf_ds_to_the_trained_logits(exported) -> None:
    """Merged model and PEFT adapter, gathered a module at a time from 2 ranks' shards, load in
    a process that never imports molf_ds and compute what the trained FSDP2 model computed."""
    trained, reloaded = exported["trained"], exported["reloaded"]
    assert reloaded["molf_ds_imported"] == []
    assert all(not keys for keys in reloaded["loading_info"].values()), reloaded["loading_info"]
    for name, key in (("molf", "merged"), ("efficient", "adapter")):
        logits = trained[name]["trained"]
        # training moved the model, so an export of the untrained weights would not pass
        assert (logits - trained[name]["untrained"]).abs().max() > 100 * LOGITS_ATOL, name
        torch.testing.assert_close(reloaded[key], logits, atol=LOGITS_ATOL, rtol=0, msg=name)
    config = json.loads((exported["dir"] / "molf_merged" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not FSDP2's class


@pytest.mark.parametrize("method", ["molf", "molf-efficient"])
def test_fsdp2_memory_matches_molf_estimate(exported, method: str) -> None:
    """`molf-estimate --engine fsdp2` against 2 real ranks of a tiny Qwen2 (fp32, every
    dimension even): each rank holds exactly the estimate's sharded parameters, gradients and
    moments, and the moments are exactly half of one process's."""
    from transformers import Qwen2Config

    estimate = estimate_memory(
        Qwen2Config(**QWEN2),
        engine="fsdp2",
        num_gpus_per_node=2,
        weight_dtype="fp32",
        lora_ranks=RANKS,
        methods=(method,),
        stages=(3,),
    )
    row = estimate.row(method, 3)
    measured = exported["trained"]["molf" if method == "molf" else "efficient"]["memory"]
    assert len(measured) == 2
    for rank, got in enumerate(measured):
        assert got["params"] == row.gpu_weight_bytes, rank
        assert got["grads"] == row.gpu_grad_bytes, rank
        assert got["state"] == row.gpu_optimizer_bytes, rank
        assert got["state"] * 2 == MOMENT_BYTES * row.trainable_params, rank


def test_fsdp2_export_failure_on_rank_0_raises_on_every_rank(exported) -> None:
    """Rank 0 alone writes and alone sees the gathered unrouted weights whole: when its check
    refuses a NaN that lies in another rank's shard, every rank raises it, in one line, and
    nothing is written."""
    messages = exported["trained"]["diverged"]
    assert len(messages) == 2
    for rank, message in enumerate(messages):
        assert "non-finite" in message and "model.layers.1.input_layernorm.weight" in message, rank
        assert "\n" not in message
    assert not (exported["dir"] / "diverged").exists()

"""ZeRO-0/1/2/3 and CPU offload on 2 and 3 real CPU ranks equal one plain process.

Each case trains the tiny model of ``tests/workers/zero_train.py`` for 4 optimizer steps with
gradient accumulation 2 and gradient clipping (the reference asserts the clip was active). The
expected parameters and winners come from one plain process running `MoLFAdamW` on the same
global batches, without DeepSpeed; 3 ranks split the partitions unevenly, so parameters straddle
rank boundaries and the last partition is padded.
"""

from __future__ import annotations

import pytest
import torch

from molf_ds.ds_partitions import changed_spans
from molf_ds.memory import optimizer_state_bytes_per_rank
from molf_ds.plan import ParamRole
from molf_ds.routed_step import UNROUTED
from tests import launch
from tests.workers.zero_train import OFFLOAD_CASES

pytestmark = pytest.mark.slow  # real multi-rank DeepSpeed jobs

FP32_CASES = [
    "z0",
    "z1",
    "z2",
    "z3",
    "z1_offload",
    "z2_offload",
    "z3_offload",
    "z3_offload_param",
    "file_zero2_offload",
    "file_zero3_offload_all",
    "z2_efficient",
    "z3_efficient",
    "z1_foreach",
    "z2_foreach",
    "z3_offload_foreach",
]
BF16_CASES = ["bf16_z1", "bf16_z2", "bf16_z3"]
# molf-train's baselines: DeepSpeed's own Adam from an `optimizer` section. On CPU ranks that
# is torch's AdamW (DeepSpeed's `torch_adam`) without offload, DeepSpeedCPUAdam with it.
BASELINE_OPTIMIZERS = {
    "fft_z2": "AdamW",
    "fft_z2_offload": "DeepSpeedCPUAdam",
    "fft_z3_offload": "DeepSpeedCPUAdam",
    "lora_z2": "AdamW",
}
# Optimizer offload: molf_ds's offloaded step against the same cases with DeepSpeed's own
# (`MOLF_DS_COPY_BACK=full`), among them a module the forward pass skips after the first step,
# and a DeepSpeed the start-up check does not know.
IDLE_CASES = [case for case in OFFLOAD_CASES if case.endswith("_idle")]  # not among FP32_CASES
COPY_BACK_CASES = [f"{case}_full" for case in OFFLOAD_CASES] + IDLE_CASES
COPY_BACK_CASES.append("z2_offload_unknown_deepspeed")
DATA_WORLD = 6  # global micro-batch of 12 sequences: divides evenly over 1, 2 and 3 ranks
ATOL = 1e-5
BF16_ATOL = 3e-2  # a few bf16 ulps of O(1) weights, or one flipped near-tie update (lr=2e-2)


def _load(directory, case: str) -> dict:
    return torch.load(directory / f"{case}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero")
    common = ("--data-world", str(DATA_WORLD))
    launch.python(
        "zero_train.py",
        "--reference",
        "--out",
        str(root / "ref"),
        "--cases",
        ",".join(FP32_CASES + list(BASELINE_OPTIMIZERS)),
        *common,
    )
    for ranks in (2, 3):
        launch.deepspeed(
            ranks,
            "zero_train.py",
            "--out",
            str(root / f"w{ranks}"),
            "--cases",
            ",".join(FP32_CASES + BF16_CASES + list(BASELINE_OPTIMIZERS) + COPY_BACK_CASES),
            *common,
            # the first run on a machine also compiles DeepSpeed's CPU Adam (about 2 minutes on
            # 2 cores) for the FFT baseline under offload
            timeout=600,
        )
    launch.deepspeed(
        1, "zero_train.py", "--out", str(root / "w1"), "--cases", ",".join(BF16_CASES), *common
    )
    return {name: root / name for name in ("ref", "w1", "w2", "w3")}


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", FP32_CASES)
def test_zero_fp32_ranks_match_single_process(runs: dict, case: str, ranks: int) -> None:
    reference, got = _load(runs["ref"], case), _load(runs[f"w{ranks}"], case)
    assert reference["clipped_steps"] > 0, "the clip must be active for this test to mean much"
    assert got["world"] == ranks
    # On CPU ranks the fused kernel runs unless a case forces the multi-tensor path.
    assert got["implementation"] == ("foreach" if case.endswith("_foreach") else "fused")
    expected_winners = reference["winners"][0]
    for rank, winners in enumerate(got["winners"]):
        assert winners == expected_winners, f"rank {rank} picked other winners"
    assert set(got["params"]) == set(reference["params"])
    for name, expected in reference["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", list(BASELINE_OPTIMIZERS))
def test_zero_baselines_run_deepspeeds_adam_and_match_torch_adamw(
    runs: dict, case: str, ranks: int
) -> None:
    """The baselines' engines (molf-train's `METHODS["fft"]` and `METHODS["lora"]`) step with
    the Adam DeepSpeed picks for the layout, and end where torch's AdamW ends in one plain
    process with weight decay on matrices only and, for LoRA, ``lora_lr`` and
    ``lora_weight_decay``."""
    reference, got = _load(runs["ref"], case), _load(runs[f"w{ranks}"], case)
    assert reference["clipped_steps"] > 0
    assert got["world"] == ranks and got["basic_optimizer"] == BASELINE_OPTIMIZERS[case]
    assert set(got["params"]) == set(reference["params"])
    for name, expected in reference["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=ATOL, msg=name)
    for name in reference["trainable"]:
        assert not torch.equal(reference["params"][name], reference["initial"][name]), name


def test_zero_reference_routing_mixes_fft_and_lora(runs: dict) -> None:
    """The comparison is only as strong as the routing it sees: both kinds of winner occur."""
    winners = torch.tensor(_load(runs["ref"], "z2")["winners"][0])
    assert winners[..., 0].any() and winners[..., 1].any()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", BF16_CASES)
def test_zero_bf16_ranks_match_single_bf16_process(runs: dict, case: str, ranks: int) -> None:
    """bf16 gradients are reduced in bf16, so near-tie scores may flip against one process;
    every rank must still agree, most decisions match, and parameters stay within bf16 error."""
    single, got = _load(runs["w1"], case), _load(runs[f"w{ranks}"], case)
    first = got["winners"][0]
    for rank, winners in enumerate(got["winners"]):
        assert winners == first, f"rank {rank} picked other winners than rank 0"
    agree = (torch.tensor(first) == torch.tensor(single["winners"][0])).float().mean()
    assert agree >= 0.75, f"only {agree:.0%} of routing decisions match one bf16 process"
    for name, expected in single["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=BF16_ATOL, msg=name)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", ["z1", "z2", "z3", "z2_offload", "z3_efficient"])
def test_zero_state_bytes_per_rank_match_estimate(runs: dict, case: str, ranks: int) -> None:
    """molf-estimate's per-rank optimizer state (fp32 master + 2 moments over 1/N of the
    trainable elements) against what each real rank holds: within 5 %."""
    got = _load(runs[f"w{ranks}"], case)
    expected = optimizer_state_bytes_per_rank(got["trainable_numel"], ranks, master_weights=True)
    for rank, measured in enumerate(got["state_bytes"]):
        assert abs(measured / expected - 1) < 0.05, (rank, measured, expected)


def test_zero_cases_ran_the_intended_deepspeed_optimizer(runs: dict) -> None:
    expected = {
        "z0": "MoLFAdamW",
        "z1": "DeepSpeedZeroOptimizer",
        "z3_offload": "DeepSpeedZeroOptimizer_Stage3",
        "bf16_z1": "BF16_Optimizer",
    }
    for case, name in expected.items():
        assert _load(runs["w2"], case)["ds_optimizer"] == name, case


@pytest.mark.parametrize("case", ["z3", "z3_offload_param", "z3_efficient"])
def test_zero3_lora_factors_stay_resident(runs: dict, case: str) -> None:
    """After every forward and every step, LoRA factors are whole and available on the rank,
    while base weights are partitioned: DeepSpeed never gathers or releases the factors."""
    residency = _load(runs["w2"], case)["residency"]
    assert residency and all(r["lora_resident"] for r in residency)
    assert any(r["base_released"] for r in residency)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", OFFLOAD_CASES)
def test_offload_copy_back_writes_what_moved_and_bitwise_what_the_full_copy_writes(
    runs: dict, case: str, ranks: int
) -> None:
    """After every optimizer step (gradient accumulation 2; winners change between steps), each
    rank's model parameters equal bitwise those of the same run with DeepSpeed's full copy, and
    its model partition equals its fp32 master in the model's dtype; the bytes ``copy_`` wrote
    into the model's partition during the step (measured) are the bytes counted, and after the
    first step fewer than the whole partitions, since a module whose LoRA expert won keeps its
    FFT weights. Some steps are clipped, so the clip factor the routed step applies in place of
    DeepSpeed's pass over the gradients is checked too, also with a module the forward pass
    skips after the first step (whose gradient slot DeepSpeed keeps and multiplies again).
    Under ZeRO-3 the persistent parameters re-gathered after the step are those whose values
    changed (measured), fewer than all once a module's LoRA expert has lost."""
    selective = _load(runs[f"w{ranks}"], case)
    full = _load(runs[f"w{ranks}"], f"{case}_full")
    winners = torch.tensor(selective["winners"][0])
    assert (winners[1:] != winners[:-1]).any(), "the winners must change between steps"
    assert winners[:, :, 1].any(), "LoRA must win somewhere, or nothing is left uncopied"
    # clipped steps: the step applies DeepSpeed's clip factor (not 1) as it reads the gradients
    assert any(step["ranks"][0]["clipped"] for step in selective["after_steps"])
    assert len(selective["after_steps"]) == len(full["after_steps"]) == len(winners)
    for step, (mine, theirs) in enumerate(
        zip(selective["after_steps"], full["after_steps"], strict=True)
    ):
        assert [r["mode"] for r in mine["ranks"]] == ["selective"] * ranks, mine["ranks"]
        assert [r["mode"] for r in theirs["ranks"]] == ["full"] * ranks
        for rank, (got, expected) in enumerate(zip(mine["ranks"], theirs["ranks"], strict=True)):
            assert got["matches_master"], (step, rank)
            # measured (copy_ into the model's partition) = counted; DeepSpeed's full copy: all
            assert got["copied_bytes"] == got["last_bytes"], (step, rank)
            assert expected["copied_bytes"] == expected["partition_bytes"], (step, rank)
            assert got["model_params"].keys() == expected["model_params"].keys()
            for name, value in expected["model_params"].items():
                assert torch.equal(got["model_params"][name], value), (step, rank, name)
        written = sum(r["last_bytes"] for r in mine["ranks"])
        whole = sum(r["partition_bytes"] for r in mine["ranks"])
        assert written <= whole
        if step > 0 and winners[step, :, 1].any():
            assert written < whole, (step, written, whole)
        if case.startswith("z3"):  # persistent parameters: only those that changed re-gathered
            for got in mine["ranks"]:
                assert got["regathered_bytes"] == got["changed_persistent_bytes"] > 0, step
                if step > 0 and winners[step, :, 0].any():  # some LoRA factors lost
                    assert got["regathered_bytes"] < got["persistent_bytes"], step


@pytest.mark.parametrize("ranks", [2, 3])
def test_offload_copy_back_falls_back_to_the_full_copy_on_an_unknown_deepspeed(
    runs: dict, ranks: int
) -> None:
    """A DeepSpeed whose relied-on source differs (one method's recorded digest changed in the
    worker) gets DeepSpeed's full copy, says why, and still trains as one process does."""
    got, reference = _load(runs[f"w{ranks}"], COPY_BACK_CASES[-1]), _load(runs["ref"], "z2_offload")
    for step in got["after_steps"]:
        for rank in step["ranks"]:
            assert rank["mode"] == "full" and "DeepSpeedZeroOptimizer.step" in rank["reason"]
            assert rank["copied_bytes"] == rank["last_bytes"] == rank["partition_bytes"]
            assert rank["matches_master"]
    for name, expected in reference["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=ATOL, msg=name)


def test_changed_spans_are_the_winners_and_unrouted_slices_merged_across_gaps() -> None:
    def role(module: int, expert: int) -> ParamRole:
        return ParamRole(module=module, expert=expert, is_lora=expert > 0, decays=True)

    winners = [[False, True], [True, False]]  # module 0: LoRA won; module 1: FFT won
    pieces = [
        (role(0, 0), 0, 10),  # lost
        (role(0, 1), 10, 4),  # won, and the unrouted piece after a gap of padding joins it
        (role(UNROUTED, 0), 16, 3),
        (role(1, 1), 19, 5),  # lost
        (role(1, 0), 24, 6),  # won, the last piece
    ]
    assert changed_spans(pieces, winners) == [(10, 9), (24, 6)]
    assert changed_spans(list(reversed(pieces)), winners) == [(10, 9), (24, 6)]  # any order
    assert changed_spans(pieces, [[True, False], [False, True]]) == [(0, 10), (16, 8)]
    assert changed_spans([], winners) == []

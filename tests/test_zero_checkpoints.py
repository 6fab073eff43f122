"""DeepSpeed checkpoints of MoLF training: resume, universal checkpoints, zero_to_fp32, merge.

Real CPU ranks over gloo run ``tests/workers/zero_checkpoint.py`` (the tiny model and data of
``zero_train.py``; the batches of a step depend on the step only). Three launches:

1. 2 ranks: each case trains 4 steps uninterrupted; and again 2 steps, then
   ``save_checkpoint`` (with ``universal_checkpoint_info``); the process exits.
2. 3 ranks: resume from the 2-rank universal checkpoints; and train 2 steps and save.
3. 2 ranks, a new launch: fresh model and `MoLFAdamW` through `molf_ds.initialize`,
   ``load_checkpoint``, train steps 2..3 (same world size: bitwise; from the 3-rank universal
   checkpoints: within fp32 reduction-order error).

Between them ``python -m deepspeed.checkpoint.ds_to_universal`` converts; afterwards one plain
process rebuilds fp32 weights with DeepSpeed's ``zero_to_fp32`` and merges them, and another
that never imports molf_ds reloads the merged Qwen2 with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests import launch

pytestmark = pytest.mark.slow  # real multi-rank DeepSpeed jobs

RESUME_CASES = ["z2", "z3", "z1_offload"]
UNIVERSAL_CASES = ["z2", "z3"]
FP32_CASES = ["z2", "z3", "qwen2"]  # qwen2: a tiny transformers Qwen2ForCausalLM under ZeRO-2
STEPS, SPLIT = 4, 2  # as in the worker: checkpoints are saved after SPLIT of STEPS steps
TAG = f"step{SPLIT}"
DATA_WORLD = 6  # global micro-batch of 12 sequences on 2 and on 3 ranks
ATOL = 1e-5

HF_RELOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM

directory, inputs_file, out = sys.argv[1:]
model, info = AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32, output_loading_info=True
)
model.eval()
with torch.no_grad():
    logits = model(input_ids=torch.load(inputs_file)["inputs"]).logits
torch.save(
    {
        "logits": logits,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "class": type(model).__name__,
        "molf_ds_imported": sorted(m for m in sys.modules if m.split(".")[0] == "molf_ds"),
    },
    out,
)
"""


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _tasks(kind: str, cases: list[str], directory: Path | None = None) -> list[str]:
    return [f"{kind}:{case}" + (f":{directory}" if directory else "") for case in cases]


def _to_universal(directory: Path, cases: list[str]) -> None:
    for case in cases:
        folder = directory / case / TAG
        launch.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(folder),
                "--output_folder",
                f"{folder}_universal",
            ]
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    ckpt2, ckpt3 = root / "ckpt_w2", root / "ckpt_w3"
    out = {name: root / name for name in ("first2", "three", "second2", "fp32")}

    def deepspeed(ranks: int, out_dir: Path, tasks: list[str]) -> None:
        launch.deepspeed(
            ranks,
            "zero_checkpoint.py",
            "--out",
            str(out_dir),
            "--data-world",
            str(DATA_WORLD),
            "--tasks",
            ",".join(tasks),
        )

    deepspeed(
        2,
        out["first2"],
        _tasks("full", RESUME_CASES) + _tasks("save", [*RESUME_CASES, "qwen2"], ckpt2),
    )
    _to_universal(ckpt2, UNIVERSAL_CASES)
    deepspeed(
        3,
        out["three"],
        _tasks("universal", UNIVERSAL_CASES, ckpt2) + _tasks("save", UNIVERSAL_CASES, ckpt3),
    )
    _to_universal(ckpt3, UNIVERSAL_CASES)
    deepspeed(
        2,
        out["second2"],
        _tasks("resume", RESUME_CASES, ckpt2)
        + _tasks("fresh_moments", ["z2"], ckpt2)
        + _tasks("universal", UNIVERSAL_CASES, ckpt3),
    )
    tasks = ",".join(_tasks("fp32", FP32_CASES, ckpt2))
    launch.python("zero_checkpoint.py", "--out", str(out["fp32"]), "--tasks", tasks)
    launch.run(
        [
            sys.executable,
            "-c",
            HF_RELOAD,
            str(out["fp32"] / "merged_qwen2"),
            str(out["fp32"] / "fp32_qwen2.pt"),
            str(out["fp32"] / "hf_qwen2.pt"),
        ]
    )
    return out


def _assert_winners(got: dict, full: dict, ranks: int) -> None:
    """Every rank's winners of the resumed steps are the uninterrupted run's."""
    expected = {step: full["winners"][0][step] for step in range(SPLIT, STEPS)}
    assert len(got["winners"]) == ranks
    for rank, winners in enumerate(got["winners"]):
        assert winners == expected, f"rank {rank} picked other winners after the resume"


def _assert_optimizer_steps(got: dict, steps: int) -> None:
    """MoLFAdamW's step counts came back from the checkpoint (Python ints) and kept counting."""
    for rank, counts in enumerate(got["optimizer_steps"]):
        assert counts and all(count == ("int", steps) for count in counts), (rank, counts)


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_in_a_new_launch_is_bitwise_equal(runs: dict, case: str) -> None:
    full = _load(runs["first2"] / f"full_{case}.pt")
    resumed = _load(runs["second2"] / f"resume_{case}.pt")
    assert resumed["ds_optimizer"] == full["ds_optimizer"]
    assert "universal_checkpoint_info" in resumed["client_state_keys"]
    assert resumed["global_steps"] == STEPS
    _assert_optimizer_steps(resumed, STEPS)
    _assert_winners(resumed, full, ranks=2)
    assert set(resumed["params"]) == set(full["params"])
    for name, expected in full["params"].items():
        assert torch.equal(resumed["params"][name], expected), name


def test_resume_without_optimizer_states_differs(runs: dict) -> None:
    """Control: the comparison above sees lost moments and step counts."""
    full = _load(runs["first2"] / "full_z2.pt")
    saved = _load(runs["first2"] / "save_z2.pt")
    fresh = _load(runs["second2"] / "fresh_moments_z2.pt")
    _assert_optimizer_steps(fresh, STEPS - SPLIT)
    assert any(not torch.equal(saved["params"][n], p) for n, p in full["params"].items())
    assert any(not torch.equal(fresh["params"][n], p) for n, p in full["params"].items())


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 3), (3, 2)])
@pytest.mark.parametrize("case", UNIVERSAL_CASES)
def test_universal_checkpoint_resumes_on_another_world_size(
    runs: dict, case: str, saved_on: int, resumed_on: int
) -> None:
    full = _load(runs["first2"] / f"full_{case}.pt")
    resumed = _load(runs["three" if resumed_on == 3 else "second2"] / f"universal_{case}.pt")
    assert resumed["world"] == resumed_on
    assert resumed["ds_optimizer"] == full["ds_optimizer"]
    _assert_optimizer_steps(resumed, STEPS)
    _assert_winners(resumed, full, ranks=resumed_on)
    assert set(resumed["params"]) == set(full["params"])
    for name, expected in full["params"].items():
        torch.testing.assert_close(resumed["params"][name], expected, rtol=0, atol=ATOL, msg=name)


def test_checkpoints_saved_on_two_and_three_ranks_agree(runs: dict) -> None:
    """The 3 -> 2 resume starts from the state a 2-rank run would have saved."""
    for case in UNIVERSAL_CASES:
        on2 = _load(runs["first2"] / f"save_{case}.pt")
        on3 = _load(runs["three"] / f"save_{case}.pt")
        assert on3["world"] == 3
        for name, expected in on2["params"].items():
            torch.testing.assert_close(on3["params"][name], expected, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("case", FP32_CASES)
def test_zero_to_fp32_loads_into_wrapped_model_and_merges(runs: dict, case: str) -> None:
    saved = _load(runs["first2"] / f"save_{case}.pt")
    got = _load(runs["fp32"] / f"fp32_{case}.pt")
    assert got["state_dict_keys"] == sorted(saved["params"])
    for name, expected in saved["params"].items():
        assert torch.equal(got["params"][name], expected), name
    lora_effect = (got["unmerged_logits"] - got["without_lora_logits"]).abs().max()
    assert lora_effect > 100 * ATOL, "LoRA must change the logits, or the merge check means little"
    assert "MoLFLinear" not in got["merged_module_types"]
    assert "Linear" in got["merged_module_types"]
    torch.testing.assert_close(got["merged_logits"], got["unmerged_logits"], rtol=0, atol=ATOL)


def test_merged_qwen2_reloads_as_plain_hugging_face_model(runs: dict) -> None:
    merged = _load(runs["fp32"] / "fp32_qwen2.pt")
    reloaded = _load(runs["fp32"] / "hf_qwen2.pt")
    assert reloaded["molf_ds_imported"] == []
    assert reloaded["class"] == "Qwen2ForCausalLM"
    assert all(not keys for keys in reloaded["loading_info"].values()), reloaded["loading_info"]
    assert torch.equal(reloaded["logits"], merged["merged_logits"])

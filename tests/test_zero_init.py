"""molf-train's model under ZeRO-3 built partitioned (``deepspeed.zero.Init``), and activation
checkpointing, on real CPU ranks.

The worker (``tests/workers/zero_init_train.py``) sets each case up as molf-train does
(`models.build_model`, then the mode's engine) from one model saved with ``save_pretrained``, and
trains MoLF for a few steps. Built partitioned, no rank ever holds a base weight (0 elements right
after loading), and the run ends bitwise where the same ZeRO-3 run built whole ends, on 2 ranks
and, with parameters and optimizer offloaded, on 3. Checkpointed activations end where the run
without them ends (within 1e-5; fp32) under ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import pytest
import torch

from tests import launch

pytestmark = pytest.mark.slow  # real multi-rank DeepSpeed jobs

ON_TWO_RANKS = ["z2", "z2_checkpointed", "z3", "z3_init", "z3_init_checkpointed"]
ON_THREE_RANKS = ["z3_offload_all", "z3_offload_all_init"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from molf_ds.train.models import load_model

    root = tmp_path_factory.mktemp("zero_init")
    tokenizer, model = load_model("tiny-qwen2", seed=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for ranks, cases in ((2, ON_TWO_RANKS), (3, ON_THREE_RANKS)):
        launch.deepspeed(
            ranks,
            "zero_init_train.py",
            "--model",
            str(root / "model"),
            "--out",
            str(root / f"w{ranks}"),
            "--cases",
            ",".join(cases),
        )
    return {
        case: torch.load(root / f"w{ranks}" / f"{case}.pt", weights_only=False)
        for ranks, cases in ((2, ON_TWO_RANKS), (3, ON_THREE_RANKS))
        for case in cases
    }


def _assert_trained(run: dict) -> None:
    """The comparison means something: routing mixed FFT and LoRA winners, weights moved."""
    winners = torch.tensor(run["winners"])
    assert winners[..., 0].any() and winners[..., 1].any(), run["winners"]
    moved = [n for n, p in run["params"].items() if not torch.equal(p, run["initial"][n])]
    assert any("base.weight" in n for n in moved) and any("lora_B" in n for n in moved)


@pytest.mark.parametrize(("whole", "partitioned"), [("z3", "z3_init"), *[ON_THREE_RANKS]])
def test_zero_init_built_partitioned_trains_bitwise_like_built_whole(
    runs: dict, whole: str, partitioned: str
) -> None:
    a, b = runs[whole], runs[partitioned]
    assert a["world"] == b["world"] == (3 if "offload" in whole else 2)
    assert all(n > 0 for n in a["held_when_built"].values())  # built whole on every rank
    assert a["held_when_built"] and not any(b["held_when_built"].values())  # never whole
    assert a["checkpoint_estimate"] == b["checkpoint_estimate"]  # from ds_numel, not (0,)
    _assert_trained(a)
    assert a["winners"] == b["winners"]
    for name, expected in a["params"].items():
        assert torch.equal(b["params"][name], expected), name


@pytest.mark.parametrize(
    ("plain", "checkpointed"), [("z2", "z2_checkpointed"), ("z3", "z3_init_checkpointed")]
)
def test_gradient_checkpointing_trains_like_stored_activations(
    runs: dict, plain: str, checkpointed: str
) -> None:
    a, b = runs[plain], runs[checkpointed]
    _assert_trained(a)
    # the backward pass recomputed each layer's forward
    assert (a["layer_forwards_per_step"], b["layer_forwards_per_step"]) == (1, 2)
    assert a["winners"] == b["winners"]
    for name, expected in a["params"].items():
        torch.testing.assert_close(b["params"][name], expected, rtol=0, atol=ATOL, msg=name)

"""`molf_ds.initialize`'s config handling: what it fills, what it refuses, the shipped configs.

Expected values come from the DeepSpeed facts of docs/design.md: a client optimizer needs
`zero_allow_untested_optimizer`, offload needs `zero_force_ds_cpu_optimizer: false`, ZeRO-3 keeps
LoRA factors resident through `stage3_param_persistence_threshold`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import molf_ds
from molf_ds.errors import MoLFConfigError
from molf_ds.zero import SHIPPED_CONFIGS, ds_config_path, fill_auto, prepare_ds_config

CONFIG_DIR = SHIPPED_CONFIGS
RANK, IN, OUT = 4, 16, 24


def _optimizer() -> molf_ds.MoLFAdamW:
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN))
    config = molf_ds.MoLFConfig(lora_ranks=(RANK,), target_modules=("0", "1"), exclude_modules=())
    return molf_ds.MoLFAdamW(molf_ds.wrap(model, config), lr=1e-3)


def _filled(name: str) -> dict:
    return fill_auto(
        CONFIG_DIR / name,
        micro_batch_size=2,
        gradient_accumulation_steps=3,
        world_size=4,
        gradient_clipping=1.0,
        bf16=False,
    )


def test_prepare_client_optimizer_flag_is_set_and_reported() -> None:
    config, changes = prepare_ds_config({"zero_optimization": {"stage": 2}}, _optimizer())
    assert config["zero_allow_untested_optimizer"] is True
    assert changes == ["zero_allow_untested_optimizer=true"]


def test_prepare_offload_turns_off_forced_ds_cpu_adam() -> None:
    user = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    config, changes = prepare_ds_config(user, _optimizer())
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer=false" in changes
    assert "zero_force_ds_cpu_optimizer" not in user  # the caller's dict is not modified


def test_prepare_stage3_persists_largest_lora_factor_and_one_sub_group() -> None:
    config, _ = prepare_ds_config({"zero_optimization": {"stage": 3}}, _optimizer())
    zero = config["zero_optimization"]
    # the larger LoRA factor, but never below DeepSpeed's default of 1e5
    assert zero["stage3_param_persistence_threshold"] == max(RANK * OUT, 100_000)
    trainable = sum(p.numel() for p in _optimizer().plan.params)
    assert zero["sub_group_size"] >= trainable


def test_prepare_stage3_keeps_user_persistence_threshold() -> None:
    user = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000}}
    config, changes = prepare_ds_config(user, _optimizer())
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 10_000
    assert not any("persistence" in change for change in changes)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu", "ratio": 0.5},
                }
            },
            "ratio",
        ),
        ({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}, "`optimizer`"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin"),
        ({"zero_optimization": {"stage": 4}}, "stage"),
        ({"zero_allow_untested_optimizer": False}, "zero_allow_untested_optimizer"),
        (
            {
                "zero_force_ds_cpu_optimizer": True,
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            },
            "zero_force_ds_cpu_optimizer",
        ),
        ({"train_batch_size": "auto"}, "auto"),
    ],
)
def test_prepare_unsupported_settings_raise_before_training(config: dict, match: str) -> None:
    with pytest.raises(molf_ds.MoLFConfigError, match=match):
        prepare_ds_config(config, _optimizer())


def test_prepare_missing_or_broken_file_raises(tmp_path: Path) -> None:
    with pytest.raises(molf_ds.MoLFConfigError, match="not found"):
        prepare_ds_config(tmp_path / "nope.json", _optimizer())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(molf_ds.MoLFConfigError, match="not valid JSON"):
        prepare_ds_config(broken, _optimizer())


def test_initialize_refuses_a_plain_torch_optimizer() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(molf_ds.MoLFConfigError, match="MoLFAdamW"):
        molf_ds.initialize(model=model, optimizer=None, config={})


EXPECTED_LAYOUT = {
    "zero0.json": (0, None, None),
    "zero1.json": (1, None, None),
    "zero2.json": (2, None, None),
    "zero3.json": (3, None, None),
    "zero1_offload.json": (1, "cpu", None),
    "zero2_offload.json": (2, "cpu", None),
    "zero3_offload.json": (3, "cpu", None),
    "zero3_offload_all.json": (3, "cpu", "cpu"),
}


def test_shipped_configs_are_exactly_the_documented_set() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == sorted(EXPECTED_LAYOUT)


def test_ds_config_path_takes_a_file_or_a_shipped_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ds_configs/ link here: names must resolve to the package
    for name in ("zero3_offload", "zero3_offload.json"):
        assert ds_config_path(name) == CONFIG_DIR / "zero3_offload.json"
    own = tmp_path / "zero2.json"
    own.write_text("{}")
    assert ds_config_path("zero2.json") == Path("zero2.json")  # the user's file comes first
    assert ds_config_path(own) == own
    for missing in ("zero9", "configs/zero2.json"):
        with pytest.raises(MoLFConfigError, match="not found: give a path or one of zero0, ") as e:
            ds_config_path(missing)
        assert "zero3_offload_all" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_installed_wheel_ships_the_configs(tmp_path) -> None:
    """A non-editable install (the wheel pip would build) finds every shipped config by name."""
    repo, source = Path(__file__).resolve().parents[1], tmp_path / "source"
    # a clean copy of what the build reads: a build/ left in the checkout would hide a miss
    shutil.copytree(repo / "molf_ds", source / "molf_ds", ignore=shutil.ignore_patterns("__py*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("molf_ds-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target"]
    subprocess.run([*install, str(tmp_path / "site"), str(wheel)], check=True, timeout=300)
    probe = (
        "import json, molf_ds, molf_ds.zero as z; "
        "print(json.dumps([molf_ds.__file__] + "
        f"[str(z.ds_config_path(n)) for n in {sorted(EXPECTED_LAYOUT)!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    package, *configs = json.loads(done.stdout)
    assert Path(package).is_relative_to(tmp_path / "site")  # the installed copy, not the checkout
    for name, path in zip(sorted(EXPECTED_LAYOUT), configs, strict=True):
        assert Path(path) == tmp_path / "site" / "molf_ds" / "ds_configs" / name
        assert json.loads(Path(path).read_text()) == json.loads((CONFIG_DIR / name).read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYOUT))
def test_shipped_config_fills_and_prepares(name: str) -> None:
    stage, offload_optimizer, offload_param = EXPECTED_LAYOUT[name]
    raw = json.loads((CONFIG_DIR / name).read_text())
    assert raw["train_micro_batch_size_per_gpu"] == "auto"
    config, _ = prepare_ds_config(_filled(name), _optimizer())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert (zero.get("offload_optimizer") or {}).get("device") == offload_optimizer
    assert (zero.get("offload_param") or {}).get("device") == offload_param
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["bf16"]["enabled"] is False


def test_fill_auto_mismatch_names_both_values(tmp_path: Path) -> None:
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(molf_ds.MoLFConfigError, match=r"train_micro_batch_size_per_gpu.*8.*2"):
        fill_auto(
            path,
            micro_batch_size=2,
            gradient_accumulation_steps=1,
            world_size=1,
            gradient_clipping=1.0,
            bf16=False,
        )


def test_prepare_from_the_plan_leaves_others_auto_values_when_asked() -> None:
    """What `molf_ds.hf` does before the Trainer fills its "auto" values: the MoLF keys are set
    from the model's plan (no optimizer yet), the Trainer's "auto" keys are left to it."""
    optimizer = _optimizer()
    raw = json.loads((CONFIG_DIR / "zero3_offload.json").read_text())
    with pytest.raises(molf_ds.MoLFConfigError, match="auto"):
        prepare_ds_config(raw, optimizer.plan)
    config, _ = prepare_ds_config(raw, optimizer.plan, allow_auto=True)
    from_optimizer, _ = prepare_ds_config(_filled("zero3_offload.json"), optimizer)
    zero = config["zero_optimization"]
    for key in ("stage3_param_persistence_threshold", "sub_group_size"):
        assert zero[key] == from_optimizer["zero_optimization"][key] != "auto"
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["train_batch_size"] == "auto"  # the Trainer's to fill


def test_hf_refuses_a_peft_model_and_a_missing_molf_config() -> None:
    from peft import LoraConfig, get_peft_model

    from molf_ds.hf import _wrap_once

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN))

    with pytest.raises(molf_ds.MoLFConfigError, match="molf_config"):
        _wrap_once(model(), None, seed=0)
    peft_model = get_peft_model(model(), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(molf_ds.MoLFConfigError, match="PEFT"):
        _wrap_once(peft_model, molf_ds.MoLFConfig(lora_ranks=(2,)), seed=0)
    config = molf_ds.MoLFConfig(lora_ranks=(RANK,), target_modules=("0", "1"), exclude_modules=())
    first, second = model(), model()
    second.load_state_dict(first.state_dict())
    _wrap_once(first, config, seed=3)
    _wrap_once(second, config, seed=3)
    _wrap_once(first, None, seed=4)  # already wrapped: kept as it is
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert a.shape == b.shape and bool((a == b).all())  # LoRA factors drawn from the seed

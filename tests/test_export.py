"""Tests of `molf_ds.export`: merged and PEFT-adapter exports reload without molf_ds.

The reference is the wrapped model's own forward pass: a correct export computes the same
logits (fp32, within 1e-5) once loaded by transformers / PEFT alone. The expected adapter layout
is PEFT's own, read from ``get_peft_model_state_dict`` of a real ``PeftModel``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import molf_ds
from molf_ds.export import export_merged, export_peft_adapter

RANKS = (2, 4)
VOCAB = 64
TOL = 1e-5
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(config).eval()


def _randomise_lora(model: torch.nn.Module) -> None:
    """Non-zero B (LoRA's init leaves it zero, which would make any export look right)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in molf_ds.model.molf_layers(model):
            for i, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B, strict=True)):
                a.copy_(torch.randn(a.shape, generator=generator) * 0.2)
                b.copy_(torch.randn(b.shape, generator=generator) * 0.2 * (i + 1))


def _wrapped(tmp_path: Path, **config) -> tuple[Qwen2ForCausalLM, Path]:
    """A wrapped tiny Qwen2 with random experts, and the path of its unwrapped base."""
    model = _tiny_qwen2()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=RANKS, **config))
    _randomise_lora(model)
    return model, base_dir


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_input_ids()).logits


RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, merged, ids, out = sys.argv[1:]
    ids = torch.load(ids)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        plain = AutoModelForCausalLM.from_pretrained(merged)
        logits = {
            "adapter": peft.eval()(ids).logits,
            "merged": plain.eval()(ids).logits,
            "base": AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits,
        }
    assert "molf_ds" not in sys.modules, "the reload imported molf_ds"
    torch.save(logits, out)
    """
)


@pytest.mark.slow
def test_adapter_and_merged_reload_without_molf_ds(tmp_path):
    model, base_dir = _wrapped(tmp_path, train_base=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = export_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    merged = export_merged(model, tmp_path / "merged")
    torch.save(_input_ids(), tmp_path / "ids.pt")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    args = [str(base_dir), str(adapter), str(merged), str(tmp_path / "ids.pt")]
    subprocess.run(
        [sys.executable, "-c", RELOAD, *args, str(tmp_path / "logits.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    reloaded = torch.load(tmp_path / "logits.pt")
    expected = _logits(model)
    assert (expected - reloaded["base"]).abs().max() > 100 * TOL  # the experts matter
    torch.testing.assert_close(reloaded["adapter"], expected, atol=TOL, rtol=0)
    torch.testing.assert_close(reloaded["merged"], expected, atol=TOL, rtol=0)
    # The training model is untouched: still wrapped, same weights.
    assert len(list(molf_ds.model.molf_layers(model))) == 2 * len(PROJECTIONS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adapter_layout_is_pefts(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model, base_dir = _wrapped(tmp_path, train_base=False)
    out = export_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    total = sum(RANKS)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (total, total, False)
    assert set(config["target_modules"]) == PROJECTIONS
    assert config["base_model_name_or_path"] == str(base_dir)
    saved = load_file(out / "adapter_model.safetensors")
    lora_config = LoraConfig.from_pretrained(str(out))
    lora_config.base_model_name_or_path = None  # this base is built here, not loaded
    peft_model = get_peft_model(_tiny_qwen2(), lora_config)
    expected = get_peft_model_state_dict(peft_model)
    assert saved.keys() == expected.keys()
    assert all(saved[k].shape == expected[k].shape for k in saved)


def test_fold_matches_expert_sum(tmp_path):
    model, _ = _wrapped(tmp_path, train_base=False)
    _, layer = next(molf_ds.model.molf_layers(model))
    lora_a, lora_b = molf_ds.export.fold_experts(layer)
    assert lora_a.shape == (sum(RANKS), layer.in_features)
    torch.testing.assert_close(lora_b @ lora_a, layer.delta_weight(), atol=1e-6, rtol=0)


def test_partial_targets_use_full_names(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    skipped = "model.layers.0.self_attn.q_proj"
    model, base_dir = _wrapped(tmp_path, train_base=False, exclude_modules=("lm_head", skipped))
    out = export_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert skipped not in targets and "model.layers.1.self_attn.q_proj" in targets
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    torch.testing.assert_close(_logits(peft.eval()), _logits(model), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "config",
    [{"train_base": True}, {"train_base": False, "train_non_target": True}],
    ids=["train_base", "train_non_target"],
)
def test_adapter_refuses_trained_base(tmp_path, config):
    model, base_dir = _wrapped(tmp_path, **config)
    with pytest.raises(molf_ds.MoLFError, match="cannot .*use export_merged") as info:
        export_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "adapter").exists()


def test_unwrapped_model_is_refused(tmp_path):
    with pytest.raises(molf_ds.MoLFError, match="molf_ds.wrap"):
        export_merged(_tiny_qwen2(), tmp_path / "merged")
    with pytest.raises(molf_ds.MoLFError, match="molf_ds.wrap"):
        export_peft_adapter(_tiny_qwen2(), tmp_path / "adapter", "base")


@pytest.mark.parametrize("tied", [False, True])
def test_merged_state_dict_is_the_merged_models_and_leaves_the_model_alone(tmp_path, tied) -> None:
    """`merged_state_dict` (what `molf_ds.hf` saves, module by module) equals the state dict of
    `merge` applied to a copy, without the tied head twice; the saved result reloads with
    transformers alone to the wrapped model's logits, and the wrapped model is unchanged."""
    import copy

    from molf_ds.export import merged_state_dict
    from molf_ds.hf import save_merged

    model = _tiny_qwen2()
    model.config.tie_word_embeddings = tied
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=RANKS))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, molf_ds.MoLFLinear):
                for b in layer.lora_B:
                    b.normal_(std=0.1)  # non-zero experts, so the merge changes W
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = merged_state_dict(model)
    expected = molf_ds.merge(copy.deepcopy(model)).state_dict()
    assert ("lm_head.weight" in state) is not tied
    assert set(state) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    save_merged(model, tmp_path / "merged", write=True)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=TOL
        )
    assert merged_state_dict(model, keep=False) == {}

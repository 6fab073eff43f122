"""Tests of `molf_ds.MoLFLinear`, `molf_ds.wrap` and `molf_ds.merge`.

Expected values come from the MoLF layer definition ``y = W x + b + sum_i s_i B_i A_i x``
(computed by hand here, independently of the package), from LoRA's initialisation (``B = 0``,
so a freshly wrapped model computes exactly what the base model computes; ``A`` is
Kaiming-uniform with ``a = sqrt(5)`` as ``nn.Linear``, whose bound is ``1 / sqrt(fan_in)``),
and from PEFT's module-matching rules documented on `molf_ds.MoLFConfig`.

The decoder models are tiny Llama / Qwen2 / Gemma3 models built from configs (no downloads).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import molf_ds

# --- constants ------------------------------------------------------------------------------

IN_FEATURES = 6
OUT_FEATURES = 5
LAYER_RANKS = (2, 3)
LAYER_SCALINGS = (0.5, 2.0)
BATCH = 4

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
INTERMEDIATE_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
SEQ_LEN = 8
INPUT_BATCH = 2

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
NUM_TARGETS = len(PROJECTIONS) * NUM_LAYERS  # 7 projections per decoder layer

MODEL_RANKS = (2, 4)
LORA_INIT_STD = 0.02  # same order as the models' initializer_range, so LoRA visibly moves logits
MIN_LOGIT_CHANGE = 1e-3  # the hand-placed experts must change logits by more than this
MERGE_ATOL = 1e-5
MERGE_RTOL = 1e-5
TRAIN_STEPS = 3
TRAIN_LR = 1e-2
SUBPROCESS_TIMEOUT_S = 120

ARCHS = ("llama", "qwen2", "gemma3")


# --- helpers --------------------------------------------------------------------------------


def _common_config_kwargs() -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": 4 * SEQ_LEN,
    }


def build_model(arch: str) -> nn.Module:
    """A tiny fp32 decoder of the given architecture, built from a config, in eval mode."""
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common_config_kwargs()))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common_config_kwargs()))
    elif arch == "gemma3":
        config = Gemma3TextConfig(
            **_common_config_kwargs(), head_dim=HEAD_DIM, sliding_window=SEQ_LEN // 2
        )
        model = Gemma3ForCausalLM(config)
    else:  # pragma: no cover - test bug
        raise AssertionError(arch)
    return model.float().eval()


def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB_SIZE, (INPUT_BATCH, SEQ_LEN), generator=generator)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def molf_layers(model: nn.Module) -> dict[str, molf_ds.MoLFLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, molf_ds.MoLFLinear)}


def plain_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def expected_targets(projections=PROJECTIONS, layers=range(NUM_LAYERS)) -> set[str]:
    """The dotted names HF Llama/Qwen2/Gemma3 decoders give their projections."""
    names = set()
    for i in layers:
        for proj in projections:
            block = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
            names.add(f"model.layers.{i}.{block}.{proj}")
    return names


@torch.no_grad()
def place_nonzero_lora(model: nn.Module, seed: int = 7) -> None:
    """Overwrite every A_i and B_i with seeded Gaussian values (B != 0)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in molf_layers(model).values():
        for param in (*layer.lora_A, *layer.lora_B):
            param.copy_(torch.randn(param.shape, generator=generator) * LORA_INIT_STD)


def make_layer(bias: bool = True, dtype: torch.dtype = torch.float32) -> molf_ds.MoLFLinear:
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)
    return molf_ds.MoLFLinear(base, LAYER_RANKS, LAYER_SCALINGS, dropout=0.0)


def hand_forward(layer: molf_ds.MoLFLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + sum_i s_i (x A_i^T) B_i^T``, written out independently of the layer."""
    out = x @ layer.base.weight.T
    if layer.base.bias is not None:
        out = out + layer.base.bias
    for a, b, s in zip(layer.lora_A, layer.lora_B, LAYER_SCALINGS, strict=True):
        out = out + s * (x @ a.T) @ b.T
    return out


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


# --- MoLFLinear -----------------------------------------------------------------------------


def test_molf_linear_construction_shapes_match_ranks():
    """A_i is (r_i, in_features), B_i is (out_features, r_i); one float scaling per expert."""
    layer = make_layer()
    assert isinstance(layer.lora_A, nn.ParameterList)
    assert isinstance(layer.lora_B, nn.ParameterList)
    assert [tuple(a.shape) for a in layer.lora_A] == [(r, IN_FEATURES) for r in LAYER_RANKS]
    assert [tuple(b.shape) for b in layer.lora_B] == [(OUT_FEATURES, r) for r in LAYER_RANKS]
    assert layer.scaling == list(LAYER_SCALINGS)
    assert all(isinstance(s, float) for s in layer.scaling)
    assert layer.num_lora_experts == len(LAYER_RANKS)


def test_molf_linear_construction_keeps_original_base():
    """``.base`` is the very nn.Linear passed in (same object, same weight tensor)."""
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    weight = base.weight
    layer = molf_ds.MoLFLinear(base, LAYER_RANKS, LAYER_SCALINGS)
    assert layer.base is base
    assert layer.base.weight is weight


def test_molf_linear_lora_params_follow_base_dtype():
    """LoRA factors are created on the base weight's dtype."""
    layer = make_layer(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in (*layer.lora_A, *layer.lora_B))


def test_molf_linear_init_b_zero_and_a_kaiming_bounded():
    """LoRA init: B = 0; A nonzero and within nn.Linear's Kaiming bound 1/sqrt(fan_in)."""
    layer = make_layer()
    bound = 1.0 / math.sqrt(IN_FEATURES)
    for a, b in zip(layer.lora_A, layer.lora_B, strict=True):
        assert torch.count_nonzero(b) == 0
        assert torch.count_nonzero(a) == a.numel()
        assert a.abs().max() <= bound
        assert a.std() > 0


def test_molf_linear_init_output_equals_base():
    """With B = 0 the layer computes exactly ``base(x)``."""
    layer = make_layer()
    x = torch.randn(BATCH, 3, IN_FEATURES)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


def test_molf_linear_forward_hand_worked_example_matches():
    """Worked by hand: W = I, b = (0.5, -1), A = [[1, 1]], B = [[1], [2]], s = 0.5, x = (1, 3).

    base: (1 + 0.5, 3 - 1) = (1.5, 2); LoRA: x A^T = 4, B * 4 = (4, 8), times 0.5 = (2, 4);
    total (3.5, 6).
    """
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.copy_(torch.tensor([0.5, -1.0]))
    layer = molf_ds.MoLFLinear(base, ranks=(1,), scalings=(0.5,))
    with torch.no_grad():
        layer.lora_A[0].copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B[0].copy_(torch.tensor([[1.0], [2.0]]))
    out = layer(torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.5, 6.0]]))


def test_molf_linear_forward_nonzero_experts_matches_hand_computation():
    """Random nonzero A_i, B_i: forward equals the written-out sum over all experts."""
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        for p in (*layer.lora_A, *layer.lora_B):
            p.normal_()
    x = torch.randn(BATCH, 3, IN_FEATURES, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, hand_forward(layer, x))
    assert not torch.allclose(out, layer.base(x))


def test_molf_linear_eval_mode_dropout_is_identity():
    """LoRA dropout is off in eval mode, so the output is the deterministic formula."""
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    layer = molf_ds.MoLFLinear(base, LAYER_RANKS, LAYER_SCALINGS, dropout=0.5).eval()
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(BATCH, IN_FEATURES)
    torch.testing.assert_close(layer(x), hand_forward(layer, x))


def test_molf_linear_delta_weight_is_scaled_sum_of_products():
    """``delta_weight() = sum_i s_i B_i A_i`` with W's shape."""
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    expected = sum(
        s * b @ a for a, b, s in zip(layer.lora_A, layer.lora_B, LAYER_SCALINGS, strict=True)
    )
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape
    torch.testing.assert_close(delta, expected.detach())


def test_molf_linear_backward_nonzero_b_grad_reaches_every_expert():
    """All A_i, B_i, the base weight and bias get a nonzero .grad (dense forward)."""
    layer = make_layer()
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(BATCH, IN_FEATURES)
    layer(x).square().sum().backward()
    params = {
        "base.weight": layer.base.weight,
        "base.bias": layer.base.bias,
        **{f"lora_A.{i}": a for i, a in enumerate(layer.lora_A)},
        **{f"lora_B.{i}": b for i, b in enumerate(layer.lora_B)},
    }
    for name, param in params.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_molf_linear_mismatched_ranks_and_scalings_raises():
    """One scaling per rank is required."""
    with pytest.raises(ValueError, match="ranks"):
        molf_ds.MoLFLinear(nn.Linear(2, 2), ranks=(2, 4), scalings=(1.0,))


def test_merge_single_layer_returns_linear_with_folded_weight():
    """merge(layer) gives the base nn.Linear with W + sum_i s_i B_i A_i, same outputs."""
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(BATCH, IN_FEATURES, dtype=torch.float64)
    expected_out = hand_forward(layer, x).detach()
    expected_weight = layer.base.weight.detach().clone() + sum(
        s * b @ a for a, b, s in zip(layer.lora_A, layer.lora_B, LAYER_SCALINGS, strict=True)
    )
    merged = molf_ds.merge(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight.detach(), expected_weight.detach())
    torch.testing.assert_close(merged(x).detach(), expected_out)


# --- wrap: targets --------------------------------------------------------------------------


def test_wrap_default_config_wraps_every_projection(arch):
    """Default targets: the 7 projections of each decoder layer; lm_head stays nn.Linear."""
    model = build_model(arch)
    config = molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS)
    returned = molf_ds.wrap(model, config)
    assert returned is model
    layers = molf_layers(model)
    assert len(layers) == NUM_TARGETS
    assert set(layers) == expected_targets()
    assert type(model.lm_head) is nn.Linear
    assert set(plain_linear_names(model)) == {"lm_head"} | {f"{n}.base" for n in layers}
    for layer in layers.values():
        assert layer.ranks == MODEL_RANKS
        assert layer.scaling == pytest.approx([config.scaling(r) for r in MODEL_RANKS])


def test_wrap_default_config_logits_unchanged_at_init(arch):
    """B = 0 at init, so wrapping does not change the model's logits at all."""
    model = build_model(arch)
    ids = input_ids()
    before = logits_of(model, ids)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS))
    torch.testing.assert_close(logits_of(model, ids), before, rtol=0, atol=0)


def test_wrap_suffix_list_matches_dotted_suffixes():
    """A sequence entry matches an exact dotted name or a ``.name`` suffix."""
    model = build_model("qwen2")
    config = molf_ds.MoLFConfig(target_modules=["self_attn.q_proj", "v_proj"])
    molf_ds.wrap(model, config)
    assert set(molf_layers(model)) == expected_targets(("q_proj", "v_proj"))


def test_wrap_exact_dotted_name_matches_one_layer():
    """A full dotted name targets exactly that layer."""
    model = build_model("qwen2")
    name = "model.layers.1.mlp.down_proj"
    molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=[name]))
    assert set(molf_layers(model)) == {name}


def test_wrap_partial_suffix_without_dot_no_match_raises():
    """``"proj"`` is not a ``.name`` suffix of ``q_proj`` (PEFT matches at dot boundaries)."""
    model = build_model("qwen2")
    with pytest.raises(molf_ds.NoMatchingModulesError):
        molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=["proj"]))


def test_wrap_regex_string_full_matches_dotted_name():
    """A string is a regex full-matched against the dotted name."""
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=r".*\.(q|v)_proj"))
    assert set(molf_layers(model)) == expected_targets(("q_proj", "v_proj"))


def test_wrap_regex_string_partial_match_no_match_raises():
    """``re.fullmatch``: the bare string ``"q_proj"`` does not match ``model.layers.0...``."""
    model = build_model("qwen2")
    with pytest.raises(molf_ds.NoMatchingModulesError):
        molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules="q_proj"))


def test_wrap_match_all_regex_default_exclusion_skips_lm_head():
    """``".*"`` hits every linear, but the default exclusion keeps lm_head out."""
    model = build_model("llama")
    molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=".*"))
    assert set(molf_layers(model)) == expected_targets()
    assert type(model.lm_head) is nn.Linear


def test_wrap_exclude_list_removes_suffix_matches():
    """Exclusions use the same suffix rules and are applied before targets."""
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(exclude_modules=["mlp.down_proj", "lm_head"]))
    assert set(molf_layers(model)) == expected_targets(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    )


def test_wrap_exclude_regex_removes_whole_layer():
    """A regex exclusion of layer 0 leaves only layer 1's projections wrapped."""
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(exclude_modules=r"model\.layers\.0\..*|lm_head"))
    assert set(molf_layers(model)) == expected_targets(layers=[1])


def test_wrap_excluded_target_no_match_raises():
    """Exclusion wins: targeting only lm_head with the default exclusion matches nothing."""
    model = build_model("llama")
    with pytest.raises(molf_ds.NoMatchingModulesError):
        molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=["lm_head"]))


def test_wrap_no_match_error_lists_collapsed_linear_names():
    """The error names the linear layers seen, with layer indices collapsed to ``*``."""
    model = build_model("qwen2")
    with pytest.raises(molf_ds.NoMatchingModulesError) as excinfo:
        molf_ds.wrap(model, molf_ds.MoLFConfig(target_modules=["query"]))
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    for proj in PROJECTIONS:
        block = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
        assert f"model.layers.*.{block}.{proj}" in message
    assert "lm_head" in message
    assert "model.layers.0." not in message
    assert "model.layers.1." not in message
    assert "query" in message


def test_wrap_no_match_model_untouched():
    """A failed wrap (even MoLF-Efficient, which freezes) leaves modules and flags as they were."""
    model = build_model("qwen2")
    model.model.norm.weight.requires_grad_(False)  # a non-default flag that must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    config = molf_ds.MoLFConfig(target_modules=["nothing_here"], train_base=False)
    with pytest.raises(molf_ds.NoMatchingModulesError):
        molf_ds.wrap(model, config)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_wrap_twice_raises_and_keeps_single_wrap():
    """A second wrap is refused; the layers are not nested."""
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig())
    with pytest.raises(molf_ds.MoLFError, match="already wrapped"):
        molf_ds.wrap(model, molf_ds.MoLFConfig())
    layers = molf_layers(model)
    assert len(layers) == NUM_TARGETS
    assert all(type(layer.base) is nn.Linear for layer in layers.values())


def test_wrap_non_config_raises():
    """Passing something other than a MoLFConfig is a MoLFError."""
    model = build_model("qwen2")
    with pytest.raises(molf_ds.MoLFError, match="`config`"):
        molf_ds.wrap(model, {"lora_ranks": (8,)})
    assert not molf_layers(model)


# --- wrap: trainability ---------------------------------------------------------------------


def _lora_param_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_wrap_default_molf_everything_trainable(arch):
    """MoLF (train_base=True): base, LoRA and non-target parameters all train."""
    model = build_model(arch)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == []
    assert len(_lora_param_names(model)) == 2 * len(MODEL_RANKS) * NUM_TARGETS


def test_wrap_efficient_only_lora_trainable(arch):
    """MoLF-Efficient (train_base=False): only the LoRA factors require grad."""
    model = build_model(arch)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS, train_base=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_param_names(model)
    assert len(trainable) == 2 * len(MODEL_RANKS) * NUM_TARGETS


def test_wrap_efficient_train_non_target_keeps_embeddings_and_norms_trainable():
    """train_base=False, train_non_target=True: bases frozen (weight and bias), rest trains."""
    model = build_model("qwen2")  # Qwen2's q/k/v projections have biases
    config = molf_ds.MoLFConfig(train_base=False, train_non_target=True)
    molf_ds.wrap(model, config)
    for name, param in model.named_parameters():
        if ".base." in name:
            assert not param.requires_grad, name
        else:
            assert param.requires_grad, name
    assert model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    assert model.model.layers[0].input_layernorm.weight.requires_grad
    assert not model.model.layers[0].self_attn.q_proj.base.bias.requires_grad


def test_wrap_molf_without_non_target_freezes_only_non_target():
    """train_base=True, train_non_target=False: bases and LoRA train; embeddings, norms don't."""
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(train_base=True, train_non_target=False))
    for name, param in model.named_parameters():
        in_target = ".base." in name or ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad is in_target, name


# --- merge ----------------------------------------------------------------------------------


def _wrapped_with_nonzero_lora(arch: str) -> tuple[nn.Module, list[str]]:
    model = build_model(arch)
    original_keys = list(model.state_dict().keys())
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS))
    place_nonzero_lora(model)
    return model, original_keys


def test_merge_nonzero_experts_logits_equal_unmerged(arch):
    """Folding sum_i s_i B_i A_i into W preserves fp32 logits to 1e-5; plain linears remain."""
    ids = input_ids()
    model = build_model(arch)
    base_logits = logits_of(model, ids)
    original_keys = list(model.state_dict().keys())
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS))
    place_nonzero_lora(model)
    unmerged = logits_of(model, ids)
    assert (unmerged - base_logits).abs().max() > MIN_LOGIT_CHANGE  # the test is not vacuous

    returned = molf_ds.merge(model)

    assert returned is model
    assert not molf_layers(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert list(model.state_dict().keys()) == original_keys
    for name in expected_targets():
        assert type(model.get_submodule(name)) is nn.Linear, name
    torch.testing.assert_close(logits_of(model, ids), unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_merge_after_optimizer_steps_logits_equal_unmerged():
    """After a few MoLFAdamW steps (B no longer zero) merging keeps the logits."""
    ids = input_ids()
    model = build_model("qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=MODEL_RANKS))
    optimizer = molf_ds.MoLFAdamW(model, lr=TRAIN_LR, fused=False)
    model.train()
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    model.eval()
    assert any(
        torch.count_nonzero(b) > 0 for layer in molf_layers(model).values() for b in layer.lora_B
    ), "no LoRA expert moved, so the merge would be trivially exact"
    unmerged = logits_of(model, ids)
    molf_ds.merge(model)
    assert not molf_layers(model)
    torch.testing.assert_close(logits_of(model, ids), unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_merge_non_finite_expert_raises_and_leaves_model_unmerged():
    """A non-finite expert in the *last* layer must fail before any weight is written.

    merge's docstring: "checked for non-finite values before anything is written"; like wrap,
    a failed merge should not leave a half-merged model (some layers folded, some not).
    """
    model, _ = _wrapped_with_nonzero_lora("qwen2")
    layers = molf_layers(model)
    last_name = list(layers)[-1]
    with torch.no_grad():
        layers[last_name].lora_A[0].fill_(float("inf"))
    weights = {name: layer.base.weight.detach().clone() for name, layer in layers.items()}

    with pytest.raises(ValueError, match="non-finite"):
        molf_ds.merge(model)

    assert set(molf_layers(model)) == set(layers), "some layers were merged and replaced"
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight, weights[name]), f"{name} weight was overwritten"


def test_merge_model_without_molf_layers_raises():
    """Merging an unwrapped model is a MoLFError (and so is merging twice)."""
    model = build_model("qwen2")
    with pytest.raises(molf_ds.MoLFError):
        molf_ds.merge(model)
    molf_ds.wrap(model, molf_ds.MoLFConfig())
    molf_ds.merge(model)
    with pytest.raises(molf_ds.MoLFError):
        molf_ds.merge(model)


# The reload runs in a fresh interpreter with molf_ds made unimportable, so the saved checkpoint
# is shown to be a plain Hugging Face model.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    class _BlockMolf:
        def find_spec(self, name, path=None, target=None):
            if name == "molf_ds" or name.startswith("molf_ds."):
                raise ImportError("molf_ds must not be needed to load a merged model")
            return None

    sys.meta_path.insert(0, _BlockMolf())

    import torch
    from transformers import AutoModelForCausalLM

    model_dir, ids_path, out_path = sys.argv[1:4]
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits.float()
    assert "molf_ds" not in sys.modules, "molf_ds was imported"
    torch.save({"logits": logits, "class": type(model).__name__}, out_path)
    """
)


@pytest.mark.slow
def test_merge_save_pretrained_reloads_without_molf_ds(arch, tmp_path):
    """save_pretrained after merge reloads via AutoModelForCausalLM in a process that never
    imports molf_ds, and gives the unmerged model's logits."""
    ids = input_ids()
    model, original_keys = _wrapped_with_nonzero_lora(arch)
    unmerged = logits_of(model, ids)
    molf_ds.merge(model)
    model_dir = tmp_path / "merged"
    model.save_pretrained(model_dir)
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(model_dir), str(ids_path), str(out_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    reloaded = torch.load(out_path)
    assert reloaded["class"] == type(model).__name__
    torch.testing.assert_close(reloaded["logits"], unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)

"""Tests of `molf_ds.MoLFConfig`: validation, normalisation and LoRA scaling.

Expected values come from the documented contract of `MoLFConfig` (its docstring and the
package's public API): every invalid value raises `MoLFConfigError` at construction with the
offending field named in backticks, and ``scaling(r)`` is ``alpha / sqrt(r)`` with rsLoRA,
else ``alpha / r`` (the rsLoRA paper, Kalajdzievski 2023, and the original LoRA paper).
"""

from __future__ import annotations

import json
import math

import pytest

import molf_ds
from molf_ds.config import DEFAULT_EXCLUDE_MODULES, DEFAULT_TARGET_MODULES

DEFAULT_RANKS = (64,)
DEFAULT_ALPHA = 16.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- errors ---------------------------------------------------------------------------------


def test_config_error_is_value_error_subclass():
    """The API documents MoLFConfigError as a ValueError (via MoLFError), as PEFT does."""
    assert issubclass(molf_ds.MoLFConfigError, ValueError)
    assert issubclass(molf_ds.MoLFConfigError, molf_ds.MoLFError)
    assert issubclass(molf_ds.NoMatchingModulesError, ValueError)


# --- defaults and normalisation -------------------------------------------------------------


def test_config_defaults_match_documented_values():
    """Defaults are the ones listed in the public API description."""
    config = molf_ds.MoLFConfig()
    assert config.lora_ranks == DEFAULT_RANKS
    assert config.lora_alpha == DEFAULT_ALPHA
    assert config.use_rslora is True
    assert config.lora_dropout == 0.0
    assert config.target_modules == PROJECTIONS == DEFAULT_TARGET_MODULES
    assert config.exclude_modules == ("lm_head",) == DEFAULT_EXCLUDE_MODULES
    assert config.train_base is True
    assert config.train_non_target is None


def test_config_int_rank_becomes_one_tuple():
    """An int rank is accepted and normalised to a one-expert tuple."""
    assert molf_ds.MoLFConfig(lora_ranks=8).lora_ranks == (8,)


def test_config_list_ranks_becomes_tuple():
    """A list of ranks is normalised to a tuple, order kept."""
    config = molf_ds.MoLFConfig(lora_ranks=[8, 64, 4])
    assert config.lora_ranks == (8, 64, 4)
    assert isinstance(config.lora_ranks, tuple)


def test_config_list_module_names_become_tuples():
    """Lists of target / exclude names are normalised to tuples."""
    config = molf_ds.MoLFConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["x"])
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.exclude_modules == ("x",)


def test_config_regex_string_target_kept_as_string():
    """A single string is a regex and must stay a string (not split into characters)."""
    pattern = r".*\.(q|v)_proj"
    config = molf_ds.MoLFConfig(target_modules=pattern, exclude_modules="lm_head")
    assert config.target_modules == pattern
    assert config.exclude_modules == "lm_head"


def test_config_none_exclude_modules_becomes_empty_tuple():
    """``exclude_modules=None`` means "exclude nothing"."""
    assert molf_ds.MoLFConfig(exclude_modules=None).exclude_modules == ()


@pytest.mark.parametrize(
    ("train_base", "train_non_target", "expected"),
    [(True, None, True), (False, None, False), (False, True, True), (True, False, False)],
)
def test_config_trains_non_target_follows_train_base_when_none(
    train_base, train_non_target, expected
):
    """``train_non_target=None`` follows ``train_base``; an explicit bool wins."""
    config = molf_ds.MoLFConfig(train_base=train_base, train_non_target=train_non_target)
    assert config.trains_non_target is expected


def test_config_to_dict_is_json_serialisable_with_lists():
    """``to_dict`` turns tuples into lists and round-trips through JSON."""
    config = molf_ds.MoLFConfig(lora_ranks=(8, 64), target_modules=("q_proj",))
    data = config.to_dict()
    assert data["lora_ranks"] == [8, 64]
    assert data["target_modules"] == ["q_proj"]
    assert json.loads(json.dumps(data)) == data
    assert molf_ds.MoLFConfig(**data) == config


# --- scaling --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_config_scaling_with_rslora_is_alpha_over_sqrt_rank(rank):
    """rsLoRA: s = alpha / sqrt(r)."""
    config = molf_ds.MoLFConfig(lora_alpha=DEFAULT_ALPHA, use_rslora=True)
    assert config.scaling(rank) == pytest.approx(DEFAULT_ALPHA / math.sqrt(rank))


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_config_scaling_without_rslora_is_alpha_over_rank(rank):
    """Classic LoRA: s = alpha / r."""
    config = molf_ds.MoLFConfig(lora_alpha=DEFAULT_ALPHA, use_rslora=False)
    assert config.scaling(rank) == pytest.approx(DEFAULT_ALPHA / rank)


def test_config_scaling_known_values():
    """Hand-computed: alpha=16, r=64 -> 16/8 = 2 (rsLoRA) and 16/64 = 0.25 (LoRA)."""
    assert molf_ds.MoLFConfig(use_rslora=True).scaling(64) == pytest.approx(2.0)
    assert molf_ds.MoLFConfig(use_rslora=False).scaling(64) == pytest.approx(0.25)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [(), []])
def test_config_empty_ranks_raises(ranks):
    """An empty rank list is rejected, naming `lora_ranks`."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`lora_ranks`"):
        molf_ds.MoLFConfig(lora_ranks=ranks)


@pytest.mark.parametrize("ranks", [0, -1, (0,), (8, -4), (True,), (2.0,), ("8",)])
def test_config_non_positive_or_non_int_rank_raises(ranks):
    """Ranks must be positive ints (bools and floats are not ranks)."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`lora_ranks`"):
        molf_ds.MoLFConfig(lora_ranks=ranks)


@pytest.mark.parametrize("ranks", [None, 8.0, True])
def test_config_non_iterable_ranks_raises_config_error(ranks):
    """A scalar that is not an int must still give MoLFConfigError naming `lora_ranks`.

    The contract says every invalid value raises MoLFConfigError at construction; a bare
    TypeError from ``tuple(None)`` breaks callers that catch ValueError / MoLFConfigError.
    """
    with pytest.raises(molf_ds.MoLFConfigError, match="`lora_ranks`"):
        molf_ds.MoLFConfig(lora_ranks=ranks)


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, float("nan"), float("inf"), True, "16"])
def test_config_invalid_alpha_raises(alpha):
    """alpha must be a finite number > 0."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`lora_alpha`"):
        molf_ds.MoLFConfig(lora_alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_config_dropout_outside_unit_interval_raises(dropout):
    """Dropout must be in [0, 1)."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`lora_dropout`"):
        molf_ds.MoLFConfig(lora_dropout=dropout)


@pytest.mark.parametrize("dropout", [0, 0.0, 0.5, 0.999])
def test_config_dropout_inside_unit_interval_accepted(dropout):
    """The bounds of [0, 1): 0 is allowed, values just below 1 are allowed."""
    assert molf_ds.MoLFConfig(lora_dropout=dropout).lora_dropout == dropout


@pytest.mark.parametrize("field_name", ["use_rslora", "train_base"])
@pytest.mark.parametrize("value", [1, 0, "True", None])
def test_config_non_bool_flag_raises(field_name, value):
    """Boolean flags accept only True / False."""
    with pytest.raises(molf_ds.MoLFConfigError, match=f"`{field_name}`"):
        molf_ds.MoLFConfig(**{field_name: value})


@pytest.mark.parametrize("value", [1, 0, "no"])
def test_config_invalid_train_non_target_raises(value):
    """``train_non_target`` accepts only True, False or None."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`train_non_target`"):
        molf_ds.MoLFConfig(train_non_target=value)


@pytest.mark.parametrize("field_name", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("names", [{"q_proj"}, frozenset({"q_proj"})])
def test_config_set_of_module_names_raises(field_name, names):
    """Sets are rejected (no stable order), naming the field."""
    with pytest.raises(molf_ds.MoLFConfigError, match=f"`{field_name}`"):
        molf_ds.MoLFConfig(**{field_name: names})


@pytest.mark.parametrize("field_name", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("names", [["q_proj", ""], [1], ("q_proj", None)])
def test_config_non_string_module_name_raises(field_name, names):
    """Every name in the sequence must be a non-empty string."""
    with pytest.raises(molf_ds.MoLFConfigError, match=f"`{field_name}`"):
        molf_ds.MoLFConfig(**{field_name: names})


@pytest.mark.parametrize("field_name", ["target_modules", "exclude_modules"])
def test_config_non_iterable_module_names_raises(field_name):
    """A non-iterable, non-string value is rejected naming the field."""
    with pytest.raises(molf_ds.MoLFConfigError, match=f"`{field_name}`"):
        molf_ds.MoLFConfig(**{field_name: 5})


@pytest.mark.parametrize("names", [(), [], "", None])
def test_config_empty_target_modules_raises(names):
    """Targeting nothing is an error at construction (not a silent no-op wrap)."""
    with pytest.raises(molf_ds.MoLFConfigError, match="`target_modules`"):
        molf_ds.MoLFConfig(target_modules=names)


@pytest.mark.parametrize("field_name", ["target_modules", "exclude_modules"])
def test_config_invalid_regex_raises_config_error(field_name):
    """A string is compiled as a regex; an invalid one is an invalid value.

    The contract ("Invalid values raise MoLFConfigError at construction naming the field")
    means a malformed pattern must fail in the config, not later as ``re.error`` in wrap.
    """
    with pytest.raises(molf_ds.MoLFConfigError, match=f"`{field_name}`"):
        molf_ds.MoLFConfig(**{field_name: "model.layers.[0"})

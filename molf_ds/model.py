"""`wrap` a model's linear layers into MoLF layers, and `merge` them back into plain linears."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from molf_ds.config import MoLFConfig
from molf_ds.errors import MoLFError, NoMatchingModulesError
from molf_ds.layer import MoLFLinear


def wrap(model: nn.Module, config: MoLFConfig) -> nn.Module:
    """Replace every ``nn.Linear`` that `config` targets by a `MoLFLinear`, in place.

    All checks run before anything changes, so a failure never leaves a half-wrapped model.
    With ``config.train_base=False`` (MoLF-Efficient) the base layers are frozen; parameters
    outside targeted layers follow ``config.trains_non_target``.

    Returns:
        ``model`` itself.

    Raises:
        NoMatchingModulesError: nothing matched; the message lists the linear layers seen.
        MoLFError: the model is already wrapped.
    """
    if not isinstance(config, MoLFConfig):
        raise MoLFError(f"`config` must be a molf_ds.MoLFConfig, got {type(config).__name__}")
    if any(True for _ in molf_layers(model)):
        raise MoLFError("model is already wrapped by molf_ds.wrap; wrap it once")
    linear_names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    targets = [name for name in linear_names if is_target(name, config)]
    if not targets:
        raise NoMatchingModulesError(
            f"no linear layer matches `target_modules`={config.target_modules!r} "
            f"(excluding {config.exclude_modules!r}); linear layers in this model: "
            f"{_summarise_names(linear_names) or 'none'}"
        )

    scalings = [config.scaling(r) for r in config.lora_ranks]
    if not config.trains_non_target:
        for param in model.parameters():
            param.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        base.requires_grad_(config.train_base)
        setattr(
            parent, child_name, MoLFLinear(base, config.lora_ranks, scalings, config.lora_dropout)
        )
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold each `MoLFLinear`'s experts into its base weight and put the plain ``nn.Linear`` back.

    The deltas are computed in float32 and every merged weight is checked for non-finite values
    before any is written. The result has no molf_ds modules: a Hugging Face model saves with
    ``save_pretrained`` and reloads without molf_ds.

    Returns:
        ``model`` itself (or the merged linear when ``model`` is itself a `MoLFLinear`).
    """
    if isinstance(model, MoLFLinear):
        return model.merged_linear()
    layers = list(molf_layers(model))
    if not layers:
        raise MoLFError("model has no MoLF layers to merge; was it wrapped with molf_ds.wrap?")
    # Compute (and check) every merged weight before writing any: all or nothing.
    merged_weights = [layer.merged_weight() for _, layer in layers]
    for (name, layer), weight in zip(layers, merged_weights, strict=True):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.merged_linear(weight))
    return model


def molf_layers(model: nn.Module) -> Iterator[tuple[str, MoLFLinear]]:
    """The ``(dotted name, layer)`` of every `MoLFLinear` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoLFLinear):
            yield name, module


def is_target(name: str, config: MoLFConfig) -> bool:
    """PEFT's matching rules: exclusions first; a string is a regex full-match on the dotted
    name; a sequence matches an exact name or a ``.name`` suffix."""
    return not _matches(name, config.exclude_modules) and _matches(name, config.target_modules)


def _matches(name: str, patterns: tuple[str, ...] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _summarise_names(names: list[str], limit: int = 12) -> str:
    # Collapse layer indices so a 32-layer model lists each projection once.
    unique = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "*", name) for name in names))
    shown = ", ".join(unique[:limit])
    return shown + (f", ... ({len(unique) - limit} more)" if len(unique) > limit else "")


def named_decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the repeated blocks of a Hugging Face model (the classes it names in
    ``_no_split_modules``, e.g. ``Qwen2DecoderLayer``), in order: what FSDP2 shards one by one
    (`molf_ds.fsdp2.shard_model`) and what the memory model gathers one at a time. Found through
    any wrapper (PEFT's ``PeftModel``), and once sharded (``fully_shard`` makes a block an
    ``FSDPQwen2DecoderLayer``, a subclass)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [
        (name, module)
        for name, module in model.named_modules()
        if any(cls.__name__ in names for cls in type(module).__mro__)
    ]

"""Export a trained MoLF model as a plain Hugging Face model or as a PEFT LoRA adapter.

Both exports load without molf_ds: `export_merged` writes ``AutoModelForCausalLM`` weights,
`export_peft_adapter` writes an adapter for ``PeftModel.from_pretrained`` on the original base.
The training model is never modified, so training can go on after an export.

Under FSDP2 (DTensor parameters) both are collectives: every rank calls them, each module is
gathered whole only while it is merged or folded (`fsdp2.full_tensor`), rank 0 writes.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf_ds import ds_partitions
from molf_ds.errors import MoLFError, one_line
from molf_ds.layer import MoLFLinear, merge_experts
from molf_ds.model import merge, molf_layers
from molf_ds.runtime import is_main_rank

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_merged(model: nn.Module, output_dir: str | Path, tokenizer: Any = None) -> Path:
    """Save a merged copy of ``model`` (and ``tokenizer``) with ``save_pretrained``.

    A deep copy is merged, not ``model`` itself, so the training model keeps its MoLF layers
    (and its optimizer's references to them). Pass ``engine.module`` under DeepSpeed; under
    ZeRO-3 gather the weights first (``zero_to_fp32``), since a partitioned copy holds none.

    Under FSDP2 (``fully_shard``) call it on every rank: `merged_state_dict` gathers one module
    at a time and rank 0 writes; an error there is raised on every rank.

    Returns:
        the output directory.
    """
    _molf_layers_or_raise(model)
    if _is_fsdp2(model):
        out = Path(output_dir)
        state = merged_state_dict(model, keep=is_main_rank())

        def write() -> None:
            check_finite(state, "merged model")
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)

        _written_by_rank_0(write)
        return out
    _check_not_partitioned(model.parameters())
    merged = merge(copy.deepcopy(model))
    check_finite(merged.state_dict(), "merged model")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def merged_state_dict(model: nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of ``merge(model)`` (Hugging Face names, the model's dtypes, on the CPU),
    built one module at a time without changing ``model``.

    Works on a ZeRO-3 partitioned model and on an FSDP2 one (DTensor parameters): each module's
    parameters are gathered only while that module is merged and copied, so no rank ever holds
    more than one module gathered. It is then a collective: every rank must call it; ranks with
    ``keep=False`` (all but the one that writes) copy nothing and get an empty dict. A parameter
    shared by several modules (tied embeddings) appears once, under its first name, as in
    ``model.named_parameters()``.

    Raises:
        MoLFError: no MoLF layers, or a merged weight that is not finite.
    """
    layers = dict(_molf_layers_or_raise(model))
    inside_layer = {id(m) for layer in layers.values() for m in layer.modules()} - {
        id(layer) for layer in layers.values()
    }
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(name: str, tensor: torch.Tensor) -> None:
        if keep:
            state[name] = tensor.detach().to("cpu", copy=True)

    for prefix, module in model.named_modules():
        if id(module) in inside_layer:
            continue  # the base linear and LoRA factors of a MoLF layer: merged below
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, MoLFLinear):
            base, experts = module.base, len(module.lora_A)
            with ds_partitions.gathered([*base.parameters(), *_lora_params(module)]):
                weight, *factors = _whole([base.weight, *_lora_params(module)])
                lora_a, lora_b = factors[:experts], factors[experts:]
                put(f"{dot}weight", merge_experts(weight, lora_a, lora_b, module.scaling))
                if base.bias is not None:
                    put(f"{dot}bias", *_whole([base.bias]))
            continue
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        with ds_partitions.gathered(p for _, p in own):
            for (name, _), whole in zip(own, _whole([p for _, p in own]), strict=True):
                put(f"{dot}{name}", whole)
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                put(f"{dot}{name}", buffer)
    return state


def export_peft_adapter(
    model: nn.Module, output_dir: str | Path, base_model_name_or_path: str
) -> Path:
    """Save a MoLF-Efficient model's LoRA experts as one PEFT LoRA adapter.

    Experts of ranks ``r_1, r_2, ...`` with scalings ``s_i`` are exactly one LoRA of rank
    ``R = sum(r_i)``: ``A = cat(A_i)`` (rows), ``B = cat(s_i B_i)`` (columns), since
    ``B A = sum_i s_i B_i A_i``. The scalings are folded into ``B`` and the adapter is written
    with ``lora_alpha = r = R`` (PEFT's scaling ``alpha / r = 1``, no rsLoRA), in float32.

    Only the LoRA experts may have been trained: a model whose base (or any parameter outside
    the LoRA factors) is trainable raises `MoLFError` -- use `export_merged` for it.

    Under FSDP2 (``fully_shard``) call it on every rank: each layer's factors are gathered
    while it is folded, and rank 0 writes; an error there is raised on every rank.

    Args:
        model: the wrapped model (``engine.module`` under DeepSpeed).
        output_dir: where ``adapter_config.json`` and ``adapter_model.safetensors`` go.
        base_model_name_or_path: the base model the adapter applies to, recorded in the config.

    Returns:
        the output directory.
    """
    layers = _molf_layers_or_raise(model)
    _check_only_lora_trainable(model, layers)
    _check_not_partitioned(p for _, layer in layers for p in _lora_params(layer))
    rank = _total_rank(layers)
    state = _adapter_state_dict(layers)  # on every rank: any check below fails on all of them
    check_finite(state, "adapter")
    out = Path(output_dir)

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        config = _lora_config(model, layers, rank, base_model_name_or_path)
        config.save_pretrained(str(out))
        _save_safetensors(state, out / ADAPTER_WEIGHTS)

    if _is_fsdp2(model):
        _written_by_rank_0(write)
    else:
        write()
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `MoLFError` naming the tensors of ``tensors`` that hold a NaN or inf: a diverged
    run must not be exported as if it had trained."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise MoLFError(
            f"{what} has non-finite weights in {len(bad)} of {len(tensors)} tensors (e.g. "
            f"{bad[0]}): not exported; training diverged, lower the learning rate or clip "
            "gradients and train again"
        )


def fold_experts(layer: MoLFLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the one LoRA equal to ``layer``'s experts: ``B @ A = sum_i s_i B_i A_i``.

    Computed in float32 (or wider when the factors are), so bf16 factors lose nothing more.
    """
    return _fold(layer.lora_A, layer.lora_B, layer.scaling)


def _fold(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scaling: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(lora_a[0].dtype, torch.float32)
    with torch.no_grad():
        folded_a = torch.cat([a.detach().to(dtype) for a in lora_a], dim=0)
        folded_b = torch.cat(
            [b.detach().to(dtype) * s for b, s in zip(lora_b, scaling, strict=True)], dim=1
        )
    return folded_a.cpu().contiguous(), folded_b.cpu().contiguous()


def _is_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or a module in it (only possible once
    torch's FSDP package was imported: a plain model does not pay for the import)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from molf_ds.fsdp2 import is_fully_sharded

    return is_fully_sharded(model)


def _whole(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` whole on this rank: DTensors gathered (`fsdp2.full_tensor`, a collective),
    plain tensors (or ZeRO-3 parameters inside `ds_partitions.gathered`) as they are."""
    if "torch.distributed.tensor" not in sys.modules:
        return [t.detach() for t in tensors]
    from molf_ds.fsdp2 import full_tensor

    return [full_tensor(t) for t in tensors]


def _written_by_rank_0(write: Callable[[], None]) -> None:
    """``write()`` on rank 0 alone, then one broadcast of how it went: a failure there (a full
    disk, a non-finite weight) raises on every rank, so none goes on as if the export existed."""
    import torch.distributed as dist

    error: Exception | None = None
    if is_main_rank():
        try:
            write()
        except Exception as err:  # re-raised below, after the other ranks have heard of it
            error = err
    message = [None if error is None else one_line(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise MoLFError(f"the export failed on rank 0: {message[0]}")


def _molf_layers_or_raise(model: nn.Module) -> list[tuple[str, MoLFLinear]]:
    layers = list(molf_layers(model))
    if not layers:
        raise MoLFError(
            "model has no MoLF layers to export; pass the model molf_ds.wrap returned "
            "(engine.module under DeepSpeed)"
        )
    return layers


def _lora_params(layer: MoLFLinear) -> list[nn.Parameter]:
    return [*layer.lora_A, *layer.lora_B]


def _check_only_lora_trainable(model: nn.Module, layers: list[tuple[str, MoLFLinear]]) -> None:
    """A LoRA adapter holds only LoRA factors: any other trained parameter would be lost."""
    lora_ids = {id(p) for _, layer in layers for p in _lora_params(layer)}
    if any(p.requires_grad for _, layer in layers for p in layer.base.parameters()):
        raise MoLFError(
            "the base weights were trained (train_base=True), which a LoRA adapter cannot "
            "represent; use export_merged (molf_ds.export) instead"
        )
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if trained:
        raise MoLFError(
            f"parameters outside the LoRA experts were trained (e.g. {trained[0]}, "
            "train_non_target=True), which a LoRA adapter cannot hold; use export_merged "
            "(molf_ds.export) instead"
        )


def _check_not_partitioned(params: Iterable[torch.Tensor]) -> None:
    # ZeRO-3 leaves each rank's module parameters empty (numel 0) outside a gather.
    if any(ds_partitions.zero3_residency(p) not in (None, "whole") for p in params):
        raise MoLFError(
            "parameters are ZeRO-3 partitioned; gather them first (zero_to_fp32 or "
            "deepspeed.zero.GatheredParameters) and export the gathered model"
        )


def _total_rank(layers: list[tuple[str, MoLFLinear]]) -> int:
    totals = {sum(layer.ranks) for _, layer in layers}
    if len(totals) != 1:
        raise MoLFError(
            f"layers have different total LoRA ranks {sorted(totals)}; one adapter needs one "
            "rank: wrap with one MoLFConfig or use export_merged"
        )
    return totals.pop()


def _lora_config(model: nn.Module, layers, rank: int, base_model_name_or_path: str):
    from peft import LoraConfig

    dropouts = {_dropout_p(layer) for _, layer in layers}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=max(dropouts),
        target_modules=_target_modules(model, [name for name, _ in layers]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    return config


def _dropout_p(layer: MoLFLinear) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Leaf names (``q_proj``, ...) when under PEFT's suffix rule they select exactly the
    wrapped modules, else the full dotted names (e.g. when some layers were excluded)."""
    leaves = sorted({name.rpartition(".")[2] for name in wrapped})
    selected = {
        name
        for name, _ in model.named_modules()
        if any(name == leaf or name.endswith("." + leaf) for leaf in leaves)
    }
    return leaves if selected == set(wrapped) else list(wrapped)


def _adapter_state_dict(layers: list[tuple[str, MoLFLinear]]) -> dict[str, torch.Tensor]:
    """PEFT's on-disk key names: ``base_model.model.<module path>.lora_{A,B}.weight``."""
    state = {}
    for name, layer in layers:
        experts = len(layer.lora_A)
        factors = _whole(_lora_params(layer))
        lora_a, lora_b = _fold(factors[:experts], factors[experts:], layer.scaling)
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b
    return state


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})

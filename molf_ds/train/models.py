"""The models molf-train trains: presets built from a config (`JOB_PRESETS`, read off the one
table `molf_ds.presets.PRESETS`), local directories and hub ids (`load_model`); the mode's model
built on it, under ``deepspeed.zero.Init`` for ZeRO-3 and with activation checkpointing where
asked (`build_model`); transformers' refusal of an attention kernel as one line; trained weights
loaded back for the exports (`with_state`).

transformers is imported inside the functions that use it, not at the top: molf-train's
``--help`` and option errors answer before it loads (about a second), and
`console.quiet_dependencies` sets its warning filters before transformers and DeepSpeed import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from molf_ds.errors import MoLFError
from molf_ds.presets import PRESETS, Preset
from molf_ds.train.config import TrainConfig
from molf_ds.train.distributed import cuda, local_device
from molf_ds.train.tokenizer import byte_tokenizer

# Models built from a config (no download; random weights drawn from `seed`; the byte-level
# tokenizer): the test shapes by their names, the published ones as ``random-<name>``.
JOB_PRESETS: dict[str, Preset] = {
    **{name: p for name, p in PRESETS.items() if p.vocab_size is None},
    **{f"random-{name}": p for name, p in PRESETS.items() if p.random_in_job},
}


def build_model(
    cfg: TrainConfig, ds_config: dict, adapt: Callable[[TrainConfig, Any], Any]
) -> tuple[Any, Any]:
    """``(tokenizer, model)``: the model ``cfg`` trains, built by ``adapt`` (the mode's
    ``Method.build_model``) on the loaded one, with gradient checkpointing when asked.

    Under ZeRO-3 (``zero_init``) it is built partitioned: transformers constructs (or loads) it
    inside ``deepspeed.zero.Init``, as Trainer and accelerate do, so no rank ever holds it whole;
    a preset's random weights are then drawn by transformers' ZeRO-3 initialiser (rank 0's
    generator, seeded from ``seed``): the same on any number of ranks, other values than a
    preset built whole. The adapters' random init depends on ``seed`` alone, not on how the
    model was built.
    """
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    with _built_partitioned(ds_config if zero3 and cfg.zero_init else None):
        tokenizer, model = load_model(
            cfg.model, seed=cfg.seed, attn_implementation=cfg.attn_implementation
        )
        if cfg.gradient_checkpointing:
            _checkpoint_activations(model)
        torch.manual_seed(cfg.seed)
        model = adapt(cfg, model)
    return tokenizer, model


@contextmanager
def _built_partitioned(ds_config: dict | None) -> Iterator[None]:
    """Within: transformers builds models inside ``deepspeed.zero.Init`` for ``ds_config`` (a
    ZeRO-3 config; None: as usual), through the ``HfDeepSpeedConfig`` that Trainer and accelerate
    keep alive. After: never again, so that rank 0's export and evaluation load and generate
    alone."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig  # deferred: module docstring
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()


def _checkpoint_activations(model: Any) -> None:
    """Non-reentrant activation checkpointing (torch's recommended mode; it needs no input that
    requires grad), and no KV cache, which training never reads."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_model(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(tokenizer, model)`` from a preset (`JOB_PRESETS`: built from a config, no download;
    initialised from ``seed``, on the rank's GPU when there is one) or from a local path / hub id
    with ``from_pretrained``."""
    import transformers  # deferred: see the module docstring

    if name in JOB_PRESETS:
        return _preset_model(name, seed, attn_implementation)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise MoLFError(
            f"`model` path {name} does not exist: give a local model directory, a hub id, "
            f"or one of {', '.join(JOB_PRESETS)}"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        with _attention_problem(name, attn_implementation):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, attn_implementation=attn_implementation
            )
    except OSError as err:
        raise MoLFError(f"cannot load `model` {name!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _preset_model(name: str, seed: int, attn_implementation: str) -> tuple[Any, Any]:
    """The preset ``name`` with random weights from ``seed`` and the byte tokenizer."""
    import transformers  # deferred: see the module docstring
    from transformers.integrations import is_deepspeed_zero3_enabled

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    preset = JOB_PRESETS[name]
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    config_class = transformers.CONFIG_MAPPING[preset.model_type]
    config = config_class(vocab_size=vocab, **preset.fields)
    config.pad_token_id = tokenizer.pad_token_id
    # drawn where it will train (seconds on a GPU for a model that takes minutes on a CPU);
    # zero.Init places the partitions itself
    device = "cpu" if is_deepspeed_zero3_enabled() or not cuda() else local_device()
    with torch.device(device), _attention_problem(name, attn_implementation):
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation
        )
    return tokenizer, model


@contextmanager
def _attention_problem(name: str, attn_implementation: str) -> Iterator[None]:
    """transformers' refusal of an attention kernel (not installed, not for this model) as one
    line."""
    try:
        yield
    except (ImportError, ValueError) as err:
        if attn_implementation not in str(err) and "attention" not in str(err).lower():
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise MoLFError(
            f"`attn_implementation` {attn_implementation!r} does not work for `model` {name!r}: "
            f"{first}; choose another (sdpa is the default)"
        ) from None


def with_state(model: Any, state: dict) -> Any:
    """``model`` with the trained weights of ``state``; frozen weights may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not _is_frozen(model, name) for name in missing):
        raise MoLFError(f"final checkpoint does not match the model: {missing or unexpected}")
    return model


def _is_frozen(model: Any, name: str) -> bool:
    param = dict(model.named_parameters()).get(name)
    return param is None or not param.requires_grad

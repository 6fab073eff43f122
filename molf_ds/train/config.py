"""`TrainConfig`: every option of `molf-train`, with its default, type and meaning.

A run is configured by a YAML or JSON file (``--config FILE``) and then ``key=value`` overrides
on the command line; a value's type must match the default's, an unknown key is an error that
suggests the nearest valid one.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from molf_ds.errors import MoLFConfigError

MODES = ("fft", "lora", "adalora", "molf", "molf-efficient")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Options of `molf-train` (defaults: the main job, 2 CPU ranks, ZeRO-2, MoLF, SQL task)."""

    # I/O
    output_dir: str = field(default="runs/molf", metadata={"help": "where everything is written"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    resume: str = field(
        default="no", metadata={"help": "'no', 'auto' (newest checkpoint in output_dir) or a path"}
    )
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at end)"})
    stop_after: int = field(
        default=0, metadata={"help": "checkpoint and stop after N steps (0: run to max_steps)"}
    )
    # model
    model: str = field(
        default="tiny-qwen2",
        metadata={"help": "HF path or hub id, or tiny-qwen2 / tiny-llama / tiny-gemma3"},
    )
    # data
    data: str = field(
        default="sql", metadata={"help": "'sql' (embedded task), a .jsonl/.csv/.parquet or hub id"}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "prompt column"})
    completion_field: str = field(default="completion", metadata={"help": "completion column"})
    max_length: int = field(default=224, metadata={"help": "tokens per example"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share of the data"})
    eval_examples: int = field(default=32, metadata={"help": "held-out examples generated at end"})
    # method
    mode: str = field(default="molf", metadata={"help": "one of " + ", ".join(MODES)})
    lora_ranks: list = field(default_factory=lambda: [16], metadata={"help": "LoRA expert ranks"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator"})
    use_rslora: bool = field(default=True, metadata={"help": "alpha/sqrt(r) scaling"})
    top_k: int = field(default=1, metadata={"help": "experts updated per module"})
    score: str = field(default="epd", metadata={"help": "router score: epd or pfn"})
    # optimizer
    lr: float = field(default=3e-3, metadata={"help": "FFT (and plain AdamW) learning rate"})
    lora_lr: float | None = field(default=None, metadata={"help": "LoRA lr (default: lr)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    lora_weight_decay: float | None = field(default=None, metadata={"help": "LoRA weight decay"})
    schedule: str = field(default="cosine", metadata={"help": "constant, linear or cosine"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per rank per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per step"})
    batch_size: int = field(
        default=0,
        metadata={"help": "global batch; 0 = micro x ranks x accumulation (else must divide)"},
    )
    gradient_clipping: float = field(default=1.0, metadata={"help": "global grad-norm clip"})
    seed: int = field(default=0, metadata={"help": "model init, data order"})
    # system
    ds_config: str = field(
        default="zero2", metadata={"help": "a ds_configs/ name (zero0..zero3_offload_all) or path"}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 weights (fp32 master)"})
    log_every: int = field(default=5, metadata={"help": "log metrics every N steps"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MoLFConfigError(f"unknown `mode` {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise MoLFConfigError(
                f"unknown `schedule` {self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if self.resume not in ("no", "auto") and not Path(self.resume).exists():
            raise MoLFConfigError(f"`resume` checkpoint not found: {self.resume}")
        for name in (
            "max_length",
            "max_steps",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "top_k",
            "eval_examples",
        ):
            if getattr(self, name) < 1:
                raise MoLFConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "warmup_steps", "batch_size", "stop_after"):
            if getattr(self, name) < 0:
                raise MoLFConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise MoLFConfigError(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}")
        if not self.lora_ranks or not all(isinstance(r, int) and r > 0 for r in self.lora_ranks):
            raise MoLFConfigError(f"`lora_ranks` must be positive integers, got {self.lora_ranks}")
        experts = len(self.lora_ranks) + (1 if self.mode == "molf" else 0)
        if self.mode in ("molf", "molf-efficient") and self.top_k > experts:
            raise MoLFConfigError(
                f"`top_k`={self.top_k} is larger than the {experts} experts of mode {self.mode!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def help_text() -> str:
    """Every option with its default and meaning (``molf-train --help``)."""
    lines = []
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        lines.append(f"  {f.name:<28} {json.dumps(default):<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Build the config from a YAML/JSON file and ``key=value`` overrides (overrides win)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_file(Path(path)))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise MoLFConfigError(f"override {item!r} is not key=value (e.g. lr=1e-4)")
        values[key.strip()] = _parse_value(raw)
    known = {f.name: f for f in fields(TrainConfig)}
    typed = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise MoLFConfigError(f"unknown config key `{key}`{hint}")
        typed[key] = _check_type(key, value, known[key])
    return TrainConfig(**typed)


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise MoLFConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except Exception as err:  # yaml and json raise different types
        raise MoLFConfigError(
            f"cannot parse config file {path}: {str(err).splitlines()[0]}"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise MoLFConfigError(f"config file {path} must hold a mapping of key: value")
    return loaded


def _parse_value(raw: str) -> Any:
    # JSON first: YAML 1.1 reads "1e-4" as a string.
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _check_type(key: str, value: Any, f) -> Any:
    expected = _allowed_types(f)
    if value is None and type(None) in expected:
        return None
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if list in expected and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if str in expected and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. model=123 names a directory
    if not isinstance(value, tuple(t for t in expected if t is not type(None))) or (
        isinstance(value, bool) and bool not in expected
    ):
        names = " or ".join(t.__name__ for t in expected)
        raise MoLFConfigError(f"`{key}` must be {names}, got {value!r}")
    return value


# The annotations above, as strings (``from __future__ import annotations``).
_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (float,),
    "bool": (bool,),
    "list": (list,),
    "float | None": (float, type(None)),
}


def _allowed_types(f) -> tuple[type, ...]:
    return _TYPES[f.type]

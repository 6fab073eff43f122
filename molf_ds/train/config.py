"""`TrainConfig`: every option of `molf-train`, with its default, type, range and meaning.

A run is configured by a YAML or JSON file (``--config FILE``) and then ``key=value`` overrides
on the command line (``parse_args``). Validation is pydantic's (strict types: a bool is no int,
an int is a fine float); its errors become one line that names the key, the bad value and what
is expected, and an unknown key suggests the nearest valid one. The validated config is frozen:
what the job derives from it (ranks, accumulation steps, ZeRO stage) lives elsewhere.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from molf_ds.errors import MoLFConfigError, OneLineArgumentParser

Mode = Literal["fft", "lora", "adalora", "molf", "molf-efficient"]
Schedule = Literal["constant", "linear", "cosine"]
Score = Literal["epd", "pfn"]
TaskName = Literal["sql", "med", "fact"]  # molf_ds.train.tasks.NAMES
# transformers' attention kernels (flash_attention_* need the flash-attn package and a GPU)
AttnImplementation = Literal[
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
]
LogLevel = Literal["warning", "info", "debug"]
Engine = Literal["deepspeed", "fsdp2"]
# Options that mean something under one engine only: given under the other, they are refused
# (a silently ignored `ds_config=zero3` would train unsharded, and the other way round).
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("ds_config", "zero_init"),
    "fsdp2": ("fsdp_reshard_after_forward", "fsdp_offload"),
}
MODES: tuple[str, ...] = typing.get_args(Mode)
TASKS: tuple[str, ...] = typing.get_args(TaskName)
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
ROUTED_MODES = ("molf", "molf-efficient")

DESCRIPTION = (
    "Fine-tune a causal LM by FFT, LoRA, AdaLoRA, MoLF or MoLF-Efficient on DeepSpeed or FSDP2."
)
USAGE = "molf-train [--config FILE] [key=value ...]"
# torch.manual_seed's range (a signed or unsigned 64-bit integer); beyond it torch raises.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Options naming a path, column or config: non-empty text without NUL; a number is its text.
NAME_FIELDS = (
    "output_dir",
    "resume",
    "model",
    "data",
    "prompt_field",
    "completion_field",
    "ds_config",
)
# Counts (steps, sizes, ranks) above 2**31 - 1 are no run anyone can do, and past 2**63 they
# overflow inside DeepSpeed mid-run (gradient_accumulation_steps=10**21: OverflowError in
# engine.backward, after output_dir was written): refused with the other range errors.
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Field(le=MAX_COUNT)]
PATH_FIELDS = ("output_dir", "resume", "model", "data", "ds_config")  # (else hub ids, names)
SHOWN_CHARS = 80  # a value quoted in an error line is cut here, so the line stays readable


class TrainConfig(BaseModel):
    """Options of `molf-train` (defaults: the main job, 2 CPU ranks, ZeRO-2, MoLF, SQL task)."""

    # Floats must be finite: a NaN or infinite rate, decay or clip only shows up later as a
    # NaN model. Strings must be non-empty (Path("") is the current directory).
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, str_min_length=1
    )

    # I/O
    output_dir: str = Field("runs/molf", description="where everything is written")
    overwrite: bool = Field(False, description="replace a non-empty output_dir")
    resume: str = Field(
        "no", description="'no', 'auto' (newest checkpoint in output_dir) or a path"
    )
    save_every: Count = Field(0, ge=0, description="checkpoint every N steps (0: at end)")
    stop_after: Count = Field(
        0, ge=0, description="checkpoint and stop after N steps (0: run to max_steps)"
    )
    # model
    model: str = Field(
        "small-qwen2",
        description="HF path or hub id, or a preset: small-qwen2, tiny-qwen2, tiny-llama, "
        "tiny-gemma3, or random-qwen2.5-0.5b / random-qwen2.5-3b (those shapes, random weights)",
    )
    # data
    task: TaskName = Field(
        "sql",
        description="one of sql (text-to-SQL), med (MedMCQA), fact (CounterFact): the data's "
        "schema, the prompts and the eval metric",
    )
    data: str = Field(
        "default",
        description="'default' (sql: the embedded generated task; med/fact: the hub dataset), "
        "'sql' (embedded), a .jsonl/.json/.csv/.parquet file or a hub id",
    )
    prompt_field: str = Field("prompt", description="prompt column")
    completion_field: str = Field("completion", description="completion column")
    max_length: Count = Field(224, ge=1, description="tokens per example")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out share of the data")
    eval_examples: Count = Field(100, ge=1, description="held-out examples generated at end")
    # method
    mode: Mode = Field("molf", description="one of " + ", ".join(MODES))
    lora_ranks: tuple[Annotated[Count, Field(gt=0)], ...] = Field(
        (16,), min_length=1, description="LoRA expert ranks (one int or a list)"
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator")
    use_rslora: bool = Field(True, description="alpha/sqrt(r) scaling")
    top_k: Count = Field(1, ge=1, description="experts updated per module")
    score: Score = Field("epd", description="router score: epd or pfn")
    # optimizer
    lr: float = Field(2e-3, ge=0, description="FFT (and plain AdamW) learning rate")
    lora_lr: float | None = Field(None, ge=0, description="LoRA lr (null: lr)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    lora_weight_decay: float | None = Field(
        None, ge=0, description="LoRA weight decay (null: same)"
    )
    schedule: Schedule = Field("cosine", description="constant, linear or cosine")
    warmup_steps: Count = Field(40, ge=0, description="linear warm-up steps")
    max_steps: Count = Field(2400, ge=1, description="optimizer steps")
    micro_batch_size: Count = Field(4, ge=1, description="sequences per rank per micro-step")
    gradient_accumulation_steps: Count = Field(1, ge=1, description="micro-steps per step")
    batch_size: Count = Field(
        0, ge=0, description="global batch; 0 = micro x ranks x accumulation (else must divide)"
    )
    gradient_clipping: float = Field(1.0, ge=0, description="global grad-norm clip (0: off)")
    max_bad_steps: Count = Field(
        10,
        ge=1,
        description="stop with an error after N consecutive steps skipped for a non-finite "
        "loss or gradient",
    )
    seed: int = Field(0, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="model init, data order")
    # system
    engine: Engine = Field(
        "deepspeed",
        description="deepspeed (ZeRO, `ds_config`) or fsdp2 (PyTorch's fully_shard, checkpoints "
        "by torch.distributed.checkpoint)",
    )
    ds_config: str = Field(
        "zero2", description="a ds_configs/ name (zero0..zero3_offload_all) or path"
    )
    bf16: bool | None = Field(
        None,
        description="bf16 weights (fp32 master); null: true when the ranks are GPUs, false on "
        "CPU ranks",
    )
    zero_init: bool = Field(
        True,
        description="under ZeRO-3, build the model partitioned (deepspeed.zero.Init), so no rank "
        "ever holds it whole",
    )
    fsdp_reshard_after_forward: bool | None = Field(
        None,
        description="engine=fsdp2: free each block's gathered weights after its forward "
        "(null: true; false keeps them until the backward, more memory, one all-gather less)",
    )
    fsdp_offload: bool | None = Field(
        None,
        description="engine=fsdp2: keep the shards, gradients and optimizer step on the CPU "
        "(CPUOffloadPolicy; null: false)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (non-reentrant; use_cache off)"
    )
    attn_implementation: AttnImplementation = Field(
        "sdpa", description="attention kernel: " + ", ".join(typing.get_args(AttnImplementation))
    )
    log_every: Count = Field(5, ge=1, description="log metrics every N steps")
    log_level: LogLevel = Field(
        "warning",
        description="console: warning (quiet: DeepSpeed's warnings only, known deprecation "
        "notices of dependencies hidden), info (DeepSpeed's INFO lines), debug (everything)",
    )
    # NCCL's own watchdog default is 10 min; 5 min outlasts any one step's skew between ranks
    # (a checkpoint save included) while a hung rank still costs minutes, not half an hour
    collective_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a dead or hung rank ends the job after this many seconds of set-up or "
        "training (rank 0's exports and evaluation at the end wait under finish_timeout_s)",
    )
    finish_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="how long the other ranks wait for rank 0's exports and evaluation at the "
        "end of the run before they give up on it",
    )

    # ---- what strict types would refuse but the command line means -------------------------
    @field_validator(*NAME_FIELDS, mode="before")
    @classmethod
    def _number_as_name(cls, value: Any) -> Any:
        """``model=123`` names a directory, ``prompt_field=0`` a column: a number is a string."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator(*NAME_FIELDS)
    @classmethod
    def _no_nul(cls, value: str, info: ValidationInfo) -> str:
        """A NUL byte cannot be in a path or column name (the OS refuses it, late, as a
        traceback). Text that is not UTF-8 (lone surrogates: the command line's undecodable
        bytes) pydantic refuses already (``string_unicode``)."""
        if "\x00" in value:
            raise ValueError(f"`{info.field_name}` contains a NUL character: {shown(value)}")
        if info.field_name in PATH_FIELDS:
            _check_path_length(info.field_name, value)
        return value

    @field_validator("lora_ranks", mode="before")
    @classmethod
    def _ranks_as_tuple(cls, value: Any) -> Any:
        """``lora_ranks=8`` is one expert; a YAML/JSON list becomes the (frozen) tuple."""
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        return value

    # ---- rules across fields --------------------------------------------------------------
    @field_validator("resume")
    @classmethod
    def _resume_exists(cls, value: str) -> str:
        if value not in ("no", "auto") and not Path(value).exists():
            raise ValueError(f"`resume` checkpoint not found: {shown(value)}")
        return value

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> TrainConfig:
        experts = len(self.lora_ranks) + (1 if self.mode == "molf" else 0)
        if self.mode in ROUTED_MODES and self.top_k > experts:
            raise ValueError(
                f"`top_k`={self.top_k} is larger than the {experts} experts of mode {self.mode!r}"
            )
        return self

    @model_validator(mode="after")
    def _options_of_the_engine(self) -> TrainConfig:
        """An option of the other engine is refused, not ignored (given at all, whatever its
        value: ``ds_config=zero2 engine=fsdp2`` asks for something the run would not do)."""
        for engine, options in ENGINE_OPTIONS.items():
            if engine == self.engine:
                continue
            for option in options:
                if option in self.model_fields_set:
                    raise ValueError(
                        f"`{option}` is an option of engine={engine} only, but this run has "
                        f"engine={self.engine}: remove it, or set engine={engine}"
                    )
        return self

    def to_dict(self) -> dict:
        """The options as plain JSON values (``run_config.json``, checkpoints); the other
        engine's options are left out, so that the file reads back as this config."""
        other = [o for e, opts in ENGINE_OPTIONS.items() if e != self.engine for o in opts]
        return self.model_dump(mode="json", exclude=set(other))


def _check_path_length(key: str, value: str) -> None:
    """A path the OS cannot even look up (a name over 255 bytes, a path over 4096) makes every
    later ``Path.exists()`` raise OSError, a traceback: refused here, as the OS words it."""
    try:
        os.lstat(value)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise ValueError(
                f"`{key}` is too long a path ({err.strerror}): {shown(value)}"
            ) from None


# ---- building the config: file, then overrides -------------------------------------------
def load_config(
    path: str | None, overrides: list[str], schema: type[BaseModel] = TrainConfig
) -> Any:
    """Build the config from a YAML/JSON file and ``key=value`` overrides (overrides win).

    Raises `MoLFConfigError` with one line naming the key, the value and what is expected.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_file(Path(path)))
    values.update(parse_overrides(overrides))
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        raise MoLFConfigError(describe(err, schema)) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "lora_ranks=[4,8]"]`` → ``{"lr": 0.0001, "lora_ranks": [4, 8]}``."""
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MoLFConfigError(f"override {shown(item)} is not key=value (e.g. lr=1e-4)")
        values[key.strip()] = parse_value(raw)
    return values


def parse_value(raw: str) -> Any:
    """JSON first (YAML 1.1 reads ``1e-4`` as a string), then YAML, else the plain string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    import yaml

    try:
        return yaml.safe_load(raw)
    except Exception:  # YAMLError, or e.g. ValueError from the date 2001-02-30: a plain string
        return raw


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise MoLFConfigError(f"config file not found: {shown(str(path))}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise MoLFConfigError(
            f"cannot read config file {shown(str(path))}: {err.strerror}"
        ) from None
    except UnicodeDecodeError as err:
        raise MoLFConfigError(
            f"config file {shown(str(path))} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except Exception as err:  # yaml and json raise different types
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MoLFConfigError(
            f"cannot parse config file {shown(str(path))}: {first_line[:200]}"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise MoLFConfigError(f"config file {shown(str(path))} must hold a mapping of key: value")
    return loaded


# ---- pydantic's errors as one line ---------------------------------------------------------
_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool (true or false)",
    "string_type": "str",
    "tuple_type": "a list",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe(err: ValidationError, schema: type[BaseModel] = TrainConfig) -> str:
    """The first error of ``err`` as one line (and how many other keys are wrong)."""
    errors = err.errors(include_url=False)
    line = _describe_one(errors[0], schema)
    others = {e["loc"][:1] for e in errors} - {errors[0]["loc"][:1]}
    if others:
        line += f" (and {len(others)} more wrong key{'s' if len(others) > 1 else ''})"
    return line


def shown(value: Any) -> str:
    """``value`` as an error line quotes it: its repr (newlines escaped), cut at SHOWN_CHARS."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _describe_one(error: dict, schema: type[BaseModel]) -> str:
    kind, loc, value, ctx = error["type"], error["loc"], error["input"], error.get("ctx", {})
    if kind == "value_error":  # our validators' messages name their keys already
        return str(ctx["error"])
    key = str(loc[0]) if loc else "config"
    # A key from the user with a newline or other unprintable character is shown as its repr.
    name = key if key.isprintable() and len(key) <= SHOWN_CHARS else shown(key)
    where = f"`{name}`" + (f" item {loc[1]}" if len(loc) > 1 else "")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, list(schema.model_fields), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return f"unknown config key `{name}`{hint}"
    if kind == "literal_error":
        return f"unknown {where} {shown(value)}: choose one of {ctx['expected']}"
    bound = next((b for b in _BOUNDS if b in ctx), None)
    if bound is not None:
        return f"{where} must be {_BOUNDS[bound]} {ctx[bound]}, got {shown(value)}"
    if kind == "string_unicode":
        return f"{where} is not UTF-8 text, got {shown(value)}; use a UTF-8 name"
    if kind == "too_short":
        return f"{where} must hold at least {ctx['min_length']} item(s), got {shown(list(value))}"
    if kind in _TYPE_NAMES:
        expected = _TYPE_NAMES[kind]
        if len(loc) == 1 and _allows_none(schema, key):
            expected += " or null"
        return f"{where} must be {expected}, got {shown(value)}"
    message = " ".join(error["msg"].split())
    return f"{where}: {message[:1].lower()}{message[1:]}, got {shown(value)}"


def _allows_none(schema: type[BaseModel], key: str) -> bool:
    field = schema.model_fields.get(key)
    annotation = field.annotation if field is not None else None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


# ---- the command line ----------------------------------------------------------------------
def help_text(schema: type[BaseModel] = TrainConfig) -> str:
    """Every option with its default and meaning (the end of ``molf-train --help``)."""
    lines = []
    for name, field in schema.model_fields.items():
        default = field.default
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        lines.append(f"  {name:<28} {shown:<14} {field.description or ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        error_hint="options are key=value; see --help",
        prog="molf-train",
        usage=USAGE,
        description=DESCRIPTION,
        epilog="options (key, default, meaning):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a YAML or JSON file of options; key=value ones win"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="options (below), e.g. lr=1e-4"
    )
    # The deepspeed launcher (and torch.distributed.launch) add one to every rank's arguments.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The validated config of a command line; a bad one exits 2 with one error line."""
    parser = build_parser()
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        return load_config(args.config, args.overrides)
    except MoLFConfigError as err:
        parser.exit(2, f"molf-train: error: {err}\n")

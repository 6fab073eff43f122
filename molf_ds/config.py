"""`MoLFConfig`: which linear layers become MoLF layers, and with which LoRA experts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from molf_ds.errors import MoLFConfigError

# Attention and MLP projections of Llama / Qwen2 / Gemma-style decoders.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
DEFAULT_EXCLUDE_MODULES: tuple[str, ...] = ("lm_head",)


@dataclass
class MoLFConfig:
    """Which linear layers MoLF routes, and the LoRA experts each one gets.

    Every targeted ``nn.Linear`` becomes ``y = W x (+ b) + sum_i s_i B_i A_i dropout(x)``: ``W``
    (with its bias) is the full fine-tuning (FFT) expert, each ``(A_i, B_i)`` pair a LoRA expert.

    Args:
        lora_ranks: rank of each LoRA expert, e.g. ``(64,)`` for MoLF or ``(8, 64)`` for
            MoLF-Efficient.
        lora_alpha: LoRA scaling numerator: ``s_i = alpha / sqrt(r_i)`` with rsLoRA, else
            ``alpha / r_i``.
        use_rslora: rank-stabilised scaling (``alpha / sqrt(r)``).
        lora_dropout: dropout on the LoRA input, in ``[0, 1)``.
        target_modules: a sequence of names (a module matches when its dotted name equals one
            or ends with ``"." + name``) or one string, matched as a regex against the whole
            dotted name -- PEFT's rules.
        exclude_modules: same matching rules; checked before ``target_modules``.
        train_base: ``True`` routes among the FFT expert and the LoRA experts (MoLF);
            ``False`` freezes the base weights and routes among LoRA experts only
            (MoLF-Efficient).
        train_non_target: whether parameters outside targeted layers (embeddings, norms,
            head) are trained. ``None`` follows ``train_base`` (trained in MoLF, frozen in
            MoLF-Efficient, as in LoRA).

    Raises:
        MoLFConfigError: on an invalid value, naming the field and the fix.
    """

    lora_ranks: tuple[int, ...] = field(
        default=(64,), metadata={"help": "Rank of each LoRA expert."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    use_rslora: bool = field(default=True, metadata={"help": "Scale by alpha/sqrt(r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] | str = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "Linear layers to route."}
    )
    exclude_modules: tuple[str, ...] | str = field(
        default=DEFAULT_EXCLUDE_MODULES, metadata={"help": "Linear layers never routed."}
    )
    train_base: bool = field(
        default=True, metadata={"help": "False = MoLF-Efficient (base frozen)."}
    )
    train_non_target: bool | None = field(
        default=None, metadata={"help": "Train non-target params; None follows train_base."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_ranks, int) and not isinstance(self.lora_ranks, bool):
            self.lora_ranks = (self.lora_ranks,)
        if not isinstance(self.lora_ranks, (tuple, list)):
            raise MoLFConfigError(
                f"`lora_ranks` must be a positive int or a list of them, got {self.lora_ranks!r}"
            )
        self.lora_ranks = tuple(self.lora_ranks)
        if not self.lora_ranks:
            raise MoLFConfigError("`lora_ranks` is empty: give at least one rank, e.g. (64,)")
        for rank in self.lora_ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise MoLFConfigError(
                    f"`lora_ranks` must hold positive integers, got {self.lora_ranks!r}"
                )
        if not _is_real(self.lora_alpha) or not self.lora_alpha > 0:
            raise MoLFConfigError(
                f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}"
            )
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise MoLFConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "train_base"):
            if not isinstance(getattr(self, name), bool):
                raise MoLFConfigError(
                    f"`{name}` must be True or False, got {getattr(self, name)!r}"
                )
        if self.train_non_target is not None and not isinstance(self.train_non_target, bool):
            raise MoLFConfigError(
                f"`train_non_target` must be True, False or None, got {self.train_non_target!r}"
            )
        self.target_modules = _normalise_names("target_modules", self.target_modules)
        self.exclude_modules = _normalise_names("exclude_modules", self.exclude_modules)
        if not self.target_modules:
            raise MoLFConfigError("`target_modules` is empty: name at least one linear layer")

    @property
    def trains_non_target(self) -> bool:
        """Whether parameters outside targeted layers stay trainable."""
        return self.train_base if self.train_non_target is None else self.train_non_target

    def scaling(self, rank: int) -> float:
        """The LoRA scaling ``s`` of an expert of rank ``rank``."""
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (tuples become lists)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _normalise_names(key: str, names: object) -> tuple[str, ...] | str:
    if isinstance(names, str):
        try:
            re.compile(names)
        except re.error as err:
            raise MoLFConfigError(f"`{key}` is not a valid regex ({err}): {names!r}") from None
        return names
    if names is None:
        return ()
    if isinstance(names, (set, frozenset)):
        raise MoLFConfigError(f"`{key}` must be a list or tuple (a set has no stable order)")
    try:
        normalised = tuple(names)
    except TypeError:
        raise MoLFConfigError(
            f"`{key}` must be a list of module names or one regex string, got {names!r}"
        ) from None
    if not all(isinstance(name, str) and name for name in normalised):
        raise MoLFConfigError(f"`{key}` must hold non-empty strings, got {names!r}")
    return normalised

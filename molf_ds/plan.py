"""`RoutingPlan`: which ``(module, expert)`` each trainable parameter of a wrapped model belongs to.

The optimizer knows layers only through this plan; the plan is what every segment layout (one
process, ZeRO partitions, offload) tags its segments with.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from molf_ds.errors import MoLFError
from molf_ds.model import molf_layers
from molf_ds.routed_step import UNROUTED

FFT_EXPERT = 0
"""Expert index of the full fine-tuning expert (the base weight and bias) in every module."""


@dataclass(frozen=True)
class ParamRole:
    """Where one parameter sits: its routed module and expert, or ``UNROUTED``."""

    module: int
    expert: int
    is_lora: bool
    decays: bool  # weight decay applies: matrices only, never biases or norms


@dataclass(frozen=True)
class RoutingPlan:
    """The routed modules of a wrapped model and the role of each trainable parameter.

    Attributes:
        module_names: dotted name of each routed module, in model order.
        expert_names: ``"fft"``, ``"lora0"``, ``"lora1"``, ... (columns of the score table).
        params: the trainable parameters, in model order.
        roles: ``roles[i]`` is the role of ``params[i]``.
        expert_numel: ``N_e`` of each trainable ``(module, expert)`` (0 where frozen or absent).
    """

    module_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    roles: tuple[ParamRole, ...]
    expert_numel: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> RoutingPlan:
        layers = list(molf_layers(model))
        if not layers:
            raise MoLFError(
                "model has no MoLF layers: call molf_ds.wrap(model, MoLFConfig(...)) before "
                "building MoLFAdamW"
            )
        num_experts = 1 + max(layer.num_lora_experts for _, layer in layers)
        role_of: dict[int, ParamRole] = {}
        numel = [[0] * num_experts for _ in layers]
        for module, (_, layer) in enumerate(layers):
            experts = [[layer.base.weight, layer.base.bias]]
            experts += [[a, b] for a, b in zip(layer.lora_A, layer.lora_B, strict=True)]
            for expert, params in enumerate(experts):
                for param in params:
                    if param is None or not param.requires_grad:
                        continue
                    is_lora = expert != FFT_EXPERT
                    role_of[id(param)] = ParamRole(
                        module, expert, is_lora, takes_weight_decay(param)
                    )
                    numel[module][expert] += _full_numel(param)
        params, roles = [], []
        for param in _unique_trainable(model):
            params.append(param)
            roles.append(
                role_of.get(id(param), ParamRole(UNROUTED, 0, False, takes_weight_decay(param)))
            )
        if not params:
            raise MoLFError("model has no trainable parameters")
        return cls(
            module_names=tuple(name for name, _ in layers),
            expert_names=("fft",) + tuple(f"lora{i}" for i in range(num_experts - 1)),
            params=tuple(params),
            roles=tuple(roles),
            expert_numel=tuple(tuple(row) for row in numel),
        )

    @property
    def total_numel(self) -> int:
        """Elements of all trainable parameters (full sizes, also under ZeRO-3)."""
        return sum(_full_numel(p) for p in self.params)

    @property
    def largest_lora_numel(self) -> int:
        """Elements of the largest LoRA factor (0 when there is none)."""
        sizes = [_full_numel(p) for p, r in zip(self.params, self.roles, strict=True) if r.is_lora]
        return max(sizes, default=0)

    @property
    def num_candidates(self) -> int:
        """The fewest trainable experts of any module: the largest valid ``top_k``."""
        return min(sum(1 for n in row if n > 0) for row in self.expert_numel)


# Under ZeRO-3 (`deepspeed.zero.Init`) a parameter's local shape is (0,); its real size and shape
# are DeepSpeed's documented ``ds_numel`` / ``ds_shape`` attributes.
def _full_numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def takes_weight_decay(param: nn.Parameter) -> bool:
    """Whether decoupled weight decay applies to ``param``: to matrices (embeddings included),
    never to biases or norms, as Transformers' Trainer does (judged by the full shape, also
    when ZeRO-3 holds only a partition)."""
    return _full_ndim(param) >= 2


def weight_decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """``params`` as torch param groups: `takes_weight_decay` ones with ``weight_decay``, the
    others with none (empty groups left out)."""
    groups = [
        {"params": [p for p in params if takes_weight_decay(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not takes_weight_decay(p)], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _full_ndim(param: nn.Parameter) -> int:
    return len(getattr(param, "ds_shape", param.shape))


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for param in model.parameters():  # deduplicates tied weights already; keep order stable
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out.append(param)
    return out

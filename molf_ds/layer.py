"""`MoLFLinear`: a linear layer with one FFT expert (the base weight) and LoRA experts beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from molf_ds.errors import MoLFError


class MoLFLinear(nn.Module):
    """``y = W x (+ b) + sum_i s_i B_i A_i dropout(x)``.

    The forward pass is dense -- every expert contributes, so every expert gets its exact gradient
    on every step. Which experts *move* is the optimizer's decision (`molf_ds.MoLFAdamW`); the
    layer knows nothing about routing.

    Args:
        base: the original linear layer; kept as ``.base`` and its weight is the FFT expert.
        ranks: rank ``r_i`` of each LoRA expert.
        scalings: ``s_i`` of each expert.
        dropout: dropout probability on the LoRA input.

    Attributes:
        base: the wrapped ``nn.Linear``.
        lora_A: ``A_i`` of shape ``(r_i, in_features)``, one entry per expert.
        lora_B: ``B_i`` of shape ``(out_features, r_i)``, one entry per expert (zeros at init).
        scaling: ``s_i``, one float per expert.
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        scalings: Sequence[float],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(ranks) != len(scalings):
            raise ValueError(f"got {len(ranks)} ranks but {len(scalings)} scalings")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.ranks = tuple(int(r) for r in ranks)
        self.scaling = [float(s) for s in scalings]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, self.in_features, **factory)) for r in self.ranks
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.empty(self.out_features, r, **factory)) for r in self.ranks
        )
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @property
    def num_lora_experts(self) -> int:
        return len(self.ranks)

    def reset_lora_parameters(self) -> None:
        """LoRA's init: ``A`` Kaiming-uniform (a=sqrt(5), as ``nn.Linear``), ``B`` zero."""
        for lora_a, lora_b in zip(self.lora_A, self.lora_B, strict=True):
            _init_lora_a(lora_a)
            nn.init.zeros_(lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora_in = self.lora_dropout(x)
        for lora_a, lora_b, scale in zip(self.lora_A, self.lora_B, self.scaling, strict=True):
            # Scale the rank-r activation, not the wide output, and add in place: the base
            # output is not saved for backward, so this costs no extra pass over it.
            hidden = (lora_in @ lora_a.t().to(lora_in.dtype)).mul_(scale)
            out.add_(hidden @ lora_b.t().to(lora_in.dtype))
        return out

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``sum_i s_i B_i A_i`` in float32 (or float64 for a float64 layer), shaped like ``W``."""
        return experts_delta(self.base.weight, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + sum_i s_i B_i A_i`` in ``W``'s dtype; raises `MoLFError` if not finite."""
        return merge_experts(self.base.weight, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merged_linear(self, merged_weight: torch.Tensor | None = None) -> nn.Linear:
        """The base layer with the experts folded into its weight."""
        weight = self.merged_weight() if merged_weight is None else merged_weight
        self.base.weight.copy_(weight)
        return self.base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}"
        )


@torch.no_grad()
def experts_delta(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: Sequence[float],
) -> torch.Tensor:
    """``sum_i s_i B_i A_i`` for a base ``weight`` and its experts' factors, in float32 (float64
    for a float64 weight); the one formula, for a layer's own tensors or gathered copies of them
    (`molf_ds.export` under FSDP2)."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    for a, b, scale in zip(lora_a, lora_b, scaling, strict=True):
        delta.addmm_(b.to(dtype), a.to(dtype), alpha=scale)
    return delta


@torch.no_grad()
def merge_experts(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: Sequence[float],
) -> torch.Tensor:
    """``W + sum_i s_i B_i A_i`` in ``weight``'s dtype; raises `MoLFError` if not finite."""
    delta = experts_delta(weight, lora_a, lora_b, scaling)
    merged = weight.to(delta.dtype) + delta
    if not torch.isfinite(merged).all():
        raise MoLFError("merging produced non-finite weights; nothing was changed")
    return merged.to(weight.dtype)


def _init_lora_a(weight: torch.Tensor) -> None:
    # Same as nn.Linear.reset_parameters and PEFT's LoRA A init.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

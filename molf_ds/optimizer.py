"""`MoLFAdamW`: AdamW whose weight update goes, per module, only to the Top-K scoring experts."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from molf_ds.errors import MoLFConfigError
from molf_ds.plan import ParamRole, RoutingPlan
from molf_ds.routed_step import (
    SCORES,
    ReduceScores,
    RoutingRecord,
    RoutingTable,
    Segment,
    routed_adamw,
)

SegmentSource = Callable[["MoLFAdamW", dict], tuple[list[Segment], list[list[bool]]]]
"""Builds one step's segments and candidate flags from a parameter group, advancing steps."""


class MoLFAdamW(torch.optim.Optimizer):
    """MoLF's routed AdamW.

    Every step updates the AdamW moments of all experts from their exact gradients, scores each
    module's experts (EPD or PFN), and applies the decoupled AdamW weight update to the ``top_k``
    winners only; losers keep their new moments and their old weights. Parameters outside
    routed modules take plain AdamW at ``lr``. The math is in `molf_ds.routed_step`.

    Args:
        model: a model wrapped by `molf_ds.wrap`; its trainable parameters are optimized.
        lr: learning rate of the FFT expert and of unrouted parameters.
        lora_lr: learning rate of LoRA experts (default ``lr``); an LR scheduler scales both.
        betas, eps: AdamW's.
        weight_decay: decoupled weight decay of matrices (never of biases or norms).
        lora_weight_decay: weight decay of LoRA factors (default ``weight_decay``).
        top_k: experts updated per module, in ``[1, candidate experts]``.
        score: ``"epd"`` (expected parameter displacement) or ``"pfn"`` (normalised update norm).
        fused, foreach: the implementation, read as torch's AdamW reads them: ``fused=True``
            requires the fused CPU kernel (contiguous float32 CPU tensors), ``foreach=True`` the
            multi-tensor path (``torch._foreach_*`` ops whose number does not grow with the
            number of parameters: the path for accelerators), both ``False`` the per-tensor
            reference. Left at ``None``: the kernel where it can run, else multi-tensor.

    After each `step`, `last_routing` holds that step's winners and scores.

    Under DeepSpeed, build the engine with `molf_ds.initialize`; the engine calls `step`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        lora_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lora_weight_decay: float | None = None,
        top_k: int = 1,
        score: str = "epd",
        *,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        _check_non_negative("lr", lr)
        if lora_lr is not None:
            _check_non_negative("lora_lr", lora_lr)
            if lr == 0 and lora_lr != 0:
                raise MoLFConfigError(
                    "`lora_lr` is kept as a multiple of `lr` (so a scheduler scales both); "
                    "it cannot be non-zero when lr=0"
                )
        _check_non_negative("eps", eps)
        _check_non_negative("weight_decay", weight_decay)
        if lora_weight_decay is not None:
            _check_non_negative("lora_weight_decay", lora_weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise MoLFConfigError(f"Invalid `betas`: {betas!r}; each must be in [0, 1)")
        if score not in SCORES:
            raise MoLFConfigError(f"Invalid `score`: {score!r}; choose one of {', '.join(SCORES)}")
        for name, flag in (("fused", fused), ("foreach", foreach)):
            if flag not in (None, True, False):
                raise MoLFConfigError(f"Invalid `{name}`: {flag!r}; use None, True or False")
        if fused and foreach:
            raise MoLFConfigError("`fused` and `foreach` cannot both be True: choose one")
        plan = RoutingPlan.from_model(model)
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not 1 <= top_k <= plan.num_candidates
        ):
            raise MoLFConfigError(
                f"`top_k` must be in [1, num_experts={plan.num_candidates}], got {top_k!r}"
            )
        defaults = {
            "lr": lr,
            "lora_lr_ratio": 1.0 if lora_lr is None or lr == 0 else lora_lr / lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "lora_weight_decay": weight_decay if lora_weight_decay is None else lora_weight_decay,
            "top_k": top_k,
            "score": score,
            "fused": fused,
            "foreach": foreach,
        }
        self.plan = plan
        self.last_routing: RoutingRecord | None = None
        # Set by `molf_ds.initialize` under ZeRO, and here for FSDP2's DTensors: how the group's
        # tensors map to segments (flat partitions or local shards instead of parameters), and
        # the all-reduce of the score partial sums over the ranks that split them.
        self.segment_source: SegmentSource | None = None
        self.reduce_scores: ReduceScores | None = None
        # Set by `molf_ds.ds_partitions` for one step under ZeRO-Offload: the wrapper's
        # unscale-and-clip factor, which the step applies as it reads each gradient instead of
        # the wrapper's separate pass over all of them (`routed_adamw`'s ``grad_factor``).
        self.grad_factor = 1.0
        super().__init__([{"params": list(plan.params)}], defaults)
        self._connected_params: list | None = None
        self._connect_sharded()

    def _connect_sharded(self) -> None:
        """`fsdp2.connect` if the group's parameters are FSDP2 DTensors; remembers the list."""
        self._connected_params = self.param_groups[0]["params"]
        # A DTensor (FSDP2) cannot exist before its module is imported, and importing it costs
        # about 0.4 s: a model of plain tensors does not pay for it.
        if "torch.distributed.tensor" in sys.modules:
            from molf_ds import fsdp2

            fsdp2.connect(self)

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise MoLFConfigError(
                "MoLFAdamW builds its own parameter group from the model; "
                "set per-expert learning rates with `lora_lr` and `lora_weight_decay`"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One routed step; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        if self.segment_source is None and group["params"] is not self._connected_params:
            # accelerate's FSDP2 `prepare` (the Trainer's too) shards the model after this
            # optimizer was built and puts a new list, of the DTensors, in its group.
            self._connect_sharded()
        source = self.segment_source or _parameter_segments
        segments, candidates = source(self, group)
        # A rank holding nothing of the partition still joins the ranks' score reduction (it
        # would leave them waiting in it); alone, there is nothing to do.
        if not segments and self.reduce_scores is None:
            return loss
        beta1, beta2 = group["betas"]
        record = routed_adamw(
            segments,
            RoutingTable(self.plan.expert_numel, candidates),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            score=group["score"],
            top_k=group["top_k"],
            reduce_scores=self.reduce_scores,
            fused=group["fused"],
            foreach=group["foreach"],
            grad_factor=self.grad_factor,
        )
        self.last_routing = dataclasses.replace(
            record, module_names=self.plan.module_names, expert_names=self.plan.expert_names
        )
        return loss

    def advance_state(self, tensor: torch.Tensor) -> dict:
        """``tensor``'s state, created on first use, with its step count advanced by one."""
        state = self.state[tensor]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The loaded state has no step of this process behind it: a record left from before
        # (under FSDP2, the lr-0 step torch's `get_state_dict` takes to create a fresh
        # optimizer's state) would describe a step that never trained the loaded weights.
        self.last_routing = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", None)
            group.setdefault("foreach", None)


def _parameter_segments(
    optimizer: MoLFAdamW, group: dict
) -> tuple[list[Segment], list[list[bool]]]:
    """One segment per parameter with a gradient; advances those parameters' step counts.

    An expert is a candidate when any of its parameters has a gradient; parameters without
    one are skipped entirely, as ``torch.optim.AdamW`` skips them. This runs every step for
    every parameter, so it stays free of tensor ops (the step count is a Python int).
    """
    segments, candidates = [], [[False] * len(row) for row in optimizer.plan.expert_numel]
    for param, role in zip(group["params"], optimizer.plan.roles, strict=True):
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise MoLFConfigError("MoLFAdamW does not support sparse gradients")
        state = optimizer.advance_state(param)
        if role.module >= 0:
            candidates[role.module][role.expert] = True
        grad = grad if grad.is_contiguous() else grad.contiguous()
        segments.append(make_segment(group, role, param, grad, state))
    return segments, candidates


def make_segment(
    group: dict, role: ParamRole, param: torch.Tensor, grad: torch.Tensor, state: dict
) -> Segment:
    """The segment of a whole parameter, with the learning rate and weight decay its role takes
    from ``group`` (`flat_segments` cuts them from a flat partition)."""
    return _segment(group, role, param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])


def flat_segments(
    group: dict,
    flat: torch.Tensor,
    state: dict,
    pieces: Sequence[tuple[ParamRole, int, int]],
    views: dict | None = None,
) -> list[Segment]:
    """The segments of ``pieces`` (``(role, start, numel)``, not overlapping) of a flat partition
    ``flat`` (gradient in ``flat.grad``, moments in ``state``), in the order given.

    Each of the four tensors is cut by one ``split`` (the gaps between pieces, padding or no
    one's, are cut too and left): a few hundred ``narrow`` calls per step cost about 4x more.
    ``views``, a dict the caller keeps from step to step, keeps the splits of the partition and
    its moments, which live as long as the engine, while they and the cut stay the same (a few
    hundred views cost most of a millisecond per step); the gradient, which ZeRO may allocate
    anew every step, is cut every time."""
    sizes, slot_of = _split_sizes([(start, numel) for _, start, numel in pieces], flat.numel())
    params, exp_avgs, exp_avg_sqs = (
        _split(t, sizes, views, slot)
        for slot, t in enumerate((flat, state["exp_avg"], state["exp_avg_sq"]))
    )
    grads = flat.grad.view(-1).split(sizes)
    step = state["step"]
    return [
        _segment(group, role, params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], step)
        for (role, _, _), k in zip(pieces, slot_of, strict=True)
    ]


def _split(
    tensor: torch.Tensor, sizes: list[int], views: dict | None, slot: int
) -> Sequence[torch.Tensor]:
    if views is None:
        return tensor.view(-1).split(sizes)
    # One entry per slot, so a replaced tensor (a loaded checkpoint's moments) is let go. A kept
    # view holds its base alive, so no other tensor can have this one's id meanwhile.
    key = (id(tensor), tensor.data_ptr(), tensor.numel(), tuple(sizes))
    kept = views.get(slot)
    if kept is None or kept[0] != key:
        kept = views[slot] = (key, tensor.view(-1).split(sizes))
    return kept[1]


def _split_sizes(spans: Sequence[tuple[int, int]], total: int) -> tuple[list[int], list[int]]:
    """The sizes that split ``total`` elements at every ``(start, numel)`` span's bounds, and
    which split holds each span."""
    sizes, slot_of, end = [], [0] * len(spans), 0
    for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        start, numel = spans[i]
        if start < end:
            raise ValueError(f"slices of the flat partition overlap at element {start}")
        if start > end:  # a gap: padding, or what this rank holds of no routed parameter
            sizes.append(start - end)
        slot_of[i] = len(sizes)
        sizes.append(numel)
        end = start + numel
    if end > total:
        raise ValueError(f"a slice ends at element {end}, past the partition's {total}")
    if end < total:
        sizes.append(total - end)
    return sizes, slot_of


def _segment(
    group: dict,
    role: ParamRole,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
) -> Segment:
    if role.is_lora:
        lr, decay = group["lr"] * group["lora_lr_ratio"], group["lora_weight_decay"]
    else:
        lr, decay = group["lr"], group["weight_decay"]
    return Segment(
        param=param,
        grad=grad,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        module=role.module,
        expert=role.expert,
        lr=lr,
        weight_decay=decay if role.decays else 0.0,
        step=step,
    )


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise MoLFConfigError(f"Invalid `{name}`: {value!r}; it must be a number >= 0")

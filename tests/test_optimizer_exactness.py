"""`molf_ds.MoLFAdamW` against an independent float64 reference optimizer, step by step.

Expected values come from `_ReferenceMoLFAdamW` below: a float64, per-parameter, loop-based
implementation written here from the design equations (not from the package's code):

1. every expert's AdamW moments are updated, ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
   with one step count ``t`` for all experts;
2. each expert ``e`` with ``N_e`` trainable parameters is scored from the raw (not bias-corrected)
   moments: EPD ``S_e = lr_e / N_e * sum(m^2 / (sqrt(v) + eps))`` or
   PFN ``S_e = sqrt(sum((m / (sqrt(v) + eps))^2)) / sqrt(N_e)``;
3. the Top-K experts of each module win (ties: lower expert index first);
4. winners (and every parameter outside routed modules) take the decoupled AdamW update
   ``p <- p (1 - lr wd)``, ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``;
   weight decay only on parameters with ``ndim >= 2``; a parameter without a gradient is
   skipped entirely.

The model trains in float32 on random batches; each step the model's own gradients are handed
(as float64) to the reference, and every parameter, its moments and step count, every routing
decision and every score are compared. The other tests check properties that follow from the
same equations: losers keep their weights but not their moments, one step count for all
experts, frozen parameters never move, the fused kernel and the multi-tensor path equal the
per-tensor path, an LR scheduler scales FFT and LoRA learning rates together, and a resumed run
is bitwise identical to an uninterrupted one. Only the public API of `molf_ds` is used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import molf_ds

# --- constants ------------------------------------------------------------------------------

VOCAB = 11
D_MODEL = 8
HIDDEN = 12
OUT = 5
BATCH = 3
SEQ = 4
STEPS = 5
TARGETS = ("q_proj", "up_proj", "v_proj")
PARAM_RTOL = 1e-5
PARAM_ATOL = 1e-6
# Moments are compared relative to each tensor's largest entry (m has cancellations near zero).
MOMENT_RTOL = 1e-5
SCORE_RTOL = 1e-4
# One step from zero state: the moments are (1 - b) g and (1 - b2) g^2, exact to fp32 rounding.
FIRST_MOMENT_RTOL = 1e-6
# The reference refuses cases whose Top-K boundary is closer than this (relative): fp32 and fp64
# could then pick different winners, and the test would check rounding, not the algorithm.
MIN_RELATIVE_MARGIN = 1e-3
REFERENCE = {"fused": False, "foreach": False}
FOREACH = {"foreach": True}
FUSED = {"fused": True}
IMPLEMENTATIONS = [
    pytest.param(REFERENCE, id="reference_path"),
    pytest.param(FOREACH, id="foreach_path"),
    pytest.param(FUSED, id="fused_kernel"),
]

# Fused vs reference path comparison: a model with a few thousand parameters.
BIG_D_MODEL = 24
BIG_HIDDEN = 40
FUSED_PATH_ATOL = 1e-6
FUSED_PATH_RTOL = 1e-6


# --- model and data -------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Embedding -> q_proj (bias) -> tanh -> up_proj (no bias) -> v_proj -> LayerNorm -> head.

    ``unused`` is trainable but never called: it must never get a gradient, state or update.
    ``skip`` names routed modules to bypass in one forward pass (they then get no gradient).
    """

    def __init__(self, d_model: int = D_MODEL, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.q_proj = nn.Linear(d_model, hidden, bias=True)
        self.up_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, OUT)
        self.unused = nn.Linear(d_model, d_model)

    def forward(self, tokens: torch.Tensor, skip: Sequence[str] = ()) -> torch.Tensor:
        h = torch.tanh(self.q_proj(self.embed(tokens)))
        h = h + torch.tanh(self.up_proj(h))
        if "v_proj" not in skip:
            h = h + self.v_proj(h)
        return self.head(self.norm(h))


def _build_model(
    lora_ranks: tuple[int, ...],
    *,
    train_base: bool = True,
    use_rslora: bool = True,
    seed: int = 0,
    d_model: int = D_MODEL,
    hidden: int = HIDDEN,
) -> nn.Module:
    torch.manual_seed(seed)
    config = molf_ds.MoLFConfig(
        lora_ranks=lora_ranks,
        lora_alpha=16.0,
        use_rslora=use_rslora,
        target_modules=TARGETS,
        exclude_modules=("head",),
        train_base=train_base,
    )
    return molf_ds.wrap(TinyNet(d_model, hidden), config)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(VOCAB, (BATCH, SEQ), generator=generator)
    target = torch.randn(BATCH, SEQ, OUT, generator=generator)
    return tokens, target


def _backward(model: nn.Module, step: int, skip: Sequence[str] = ()) -> None:
    tokens, target = _batch(step)
    loss = (model(tokens, skip=skip) - target).pow(2).mean()
    loss.backward()


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().double().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


# --- the float64 reference ------------------------------------------------------------------


@dataclass
class _RefParam:
    name: str
    value: torch.Tensor  # float64
    module: int  # -1: outside routed modules
    expert: int  # 0: FFT, i + 1: LoRA expert i
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @property
    def is_lora(self) -> bool:
        return self.module >= 0 and self.expert > 0


@dataclass
class _RefRouting:
    winners: torch.Tensor  # bool [modules, experts]
    scores: torch.Tensor  # float64 [modules, experts], -inf for non-candidates
    candidates: torch.Tensor  # bool [modules, experts]


class _ReferenceMoLFAdamW:
    """Routed AdamW in float64, one parameter at a time, straight from the design equations."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        lora_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lora_weight_decay: float | None = None,
        top_k: int = 1,
        score: str = "epd",
    ) -> None:
        self.lr = lr
        self.lora_lr = lr if lora_lr is None else lora_lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.lora_weight_decay = weight_decay if lora_weight_decay is None else lora_weight_decay
        self.top_k = top_k
        self.score = score

        where: dict[int, tuple[int, int]] = {}
        self.module_names: list[str] = []
        num_lora = 0
        for name, module in model.named_modules():
            if not isinstance(module, molf_ds.MoLFLinear):
                continue
            index = len(self.module_names)
            self.module_names.append(name)
            num_lora = max(num_lora, len(module.lora_A))
            experts = [[module.base.weight, module.base.bias]]
            experts += [[a, b] for a, b in zip(module.lora_A, module.lora_B, strict=True)]
            for expert, params in enumerate(experts):
                for p in params:
                    if p is not None:
                        where[id(p)] = (index, expert)
        self.num_experts = 1 + num_lora
        self.params = [
            _RefParam(name, p.detach().double().clone(), *where.get(id(p), (-1, 0)))
            for name, p in model.named_parameters()
            if p.requires_grad
        ]
        self.numel = [[0] * self.num_experts for _ in self.module_names]
        for p in self.params:
            if p.module >= 0:
                self.numel[p.module][p.expert] += p.value.numel()

    def values(self) -> dict[str, torch.Tensor]:
        return {p.name: p.value for p in self.params}

    def step(self, grads: dict[str, torch.Tensor | None], lr_factor: float = 1.0) -> _RefRouting:
        b1, b2, eps = self.beta1, self.beta2, self.eps
        active = []
        for p in self.params:
            g = grads[p.name]
            if g is None:
                continue
            active.append(p)
            if p.exp_avg is None:
                p.exp_avg = torch.zeros_like(p.value)
                p.exp_avg_sq = torch.zeros_like(p.value)
            p.step += 1
            p.exp_avg = b1 * p.exp_avg + (1 - b1) * g
            p.exp_avg_sq = b2 * p.exp_avg_sq + (1 - b2) * g * g

        n_mod, n_exp = len(self.module_names), self.num_experts
        sums = [[0.0] * n_exp for _ in range(n_mod)]
        candidates = [[False] * n_exp for _ in range(n_mod)]
        for p in active:
            if p.module < 0:
                continue
            candidates[p.module][p.expert] = True
            denom = p.exp_avg_sq.sqrt() + eps
            if self.score == "epd":
                sums[p.module][p.expert] += float((p.exp_avg**2 / denom).sum())
            else:
                sums[p.module][p.expert] += float(((p.exp_avg / denom) ** 2).sum())

        scores = torch.full((n_mod, n_exp), -math.inf, dtype=torch.float64)
        winners = torch.zeros(n_mod, n_exp, dtype=torch.bool)
        for m in range(n_mod):
            for e in range(n_exp):
                if not candidates[m][e]:
                    continue
                n = self.numel[m][e]
                if self.score == "epd":
                    lr_e = (self.lora_lr if e > 0 else self.lr) * lr_factor
                    scores[m, e] = lr_e / n * sums[m][e]
                else:
                    scores[m, e] = math.sqrt(sums[m][e]) / math.sqrt(n)
            ranked = sorted(
                (e for e in range(n_exp) if candidates[m][e]), key=lambda e: (-scores[m, e], e)
            )
            for e in ranked[: self.top_k]:
                winners[m, e] = True
            if len(ranked) > self.top_k:
                kth = float(scores[m, ranked[self.top_k - 1]])
                nxt = float(scores[m, ranked[self.top_k]])
                assert kth - nxt > MIN_RELATIVE_MARGIN * abs(kth), (
                    f"test case is a near-tie in module {self.module_names[m]}: {kth} vs {nxt}"
                )

        for p in active:
            if p.module >= 0 and not winners[p.module, p.expert]:
                continue
            lr = (self.lora_lr if p.is_lora else self.lr) * lr_factor
            wd = self.lora_weight_decay if p.is_lora else self.weight_decay
            if p.value.ndim < 2:
                wd = 0.0
            p.value = p.value * (1.0 - lr * wd)
            bias_correction1 = 1.0 - b1**p.step
            bias_correction2 = 1.0 - b2**p.step
            denom = p.exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
            p.value = p.value - lr / bias_correction1 * p.exp_avg / denom
        return _RefRouting(winners, scores, torch.tensor(candidates, dtype=torch.bool))


# --- comparison helpers ---------------------------------------------------------------------


def _assert_matches_reference(
    model: nn.Module, opt: molf_ds.MoLFAdamW, ref: _ReferenceMoLFAdamW, step: int
) -> None:
    """Every parameter, its step count and its moments equal the reference's."""
    params = dict(model.named_parameters())
    for rp in ref.params:
        p = params[rp.name]
        where = f"step {step}, parameter {rp.name}"
        torch.testing.assert_close(
            p.detach().double(),
            rp.value,
            rtol=PARAM_RTOL,
            atol=PARAM_ATOL,
            msg=lambda m, where=where: f"{where}: {m}",
        )
        if rp.step == 0:
            assert p not in opt.state, f"{where}: has optimizer state but never had a gradient"
            continue
        state = opt.state[p]
        assert int(state["step"]) == rp.step, f"{where}: step {state['step']} != {rp.step}"
        for key, expected in (("exp_avg", rp.exp_avg), ("exp_avg_sq", rp.exp_avg_sq)):
            torch.testing.assert_close(
                state[key].double(),
                expected,
                rtol=MOMENT_RTOL,
                atol=MOMENT_RTOL * float(expected.abs().max()),
                msg=lambda m, where=where, key=key: f"{where}, {key}: {m}",
            )


def _assert_routing_matches(
    opt: molf_ds.MoLFAdamW, ref_routing: _RefRouting, ref: _ReferenceMoLFAdamW, step: int
) -> None:
    routing = opt.last_routing
    assert routing.module_names == tuple(ref.module_names)
    assert routing.winners.tolist() == ref_routing.winners.tolist(), (
        f"step {step}: winners {routing.winners.tolist()} != {ref_routing.winners.tolist()}; "
        f"scores {routing.scores.tolist()} vs {ref_routing.scores.tolist()}"
    )
    scores = routing.scores.double().cpu()
    cand = ref_routing.candidates
    assert torch.isneginf(scores[~cand]).all(), f"step {step}: non-candidates not -inf: {scores}"
    torch.testing.assert_close(scores[cand], ref_routing.scores[cand], rtol=SCORE_RTOL, atol=0.0)


@dataclass
class Case:
    lora_ranks: tuple[int, ...]
    opt_kwargs: dict
    train_base: bool = True
    use_rslora: bool = True
    clip_norm: float | None = None
    skip: dict[int, tuple[str, ...]] = field(default_factory=dict)  # step -> modules to bypass


CASES = {
    # FFT and LoRA alternate as winners across steps and modules.
    "one_lora_top1_epd": Case((4,), {"lr": 2e-2, "lora_lr": 1e-2}),
    # A large eps makes PFN depend on gradient size, so the experts do not tie at step 1.
    "one_lora_top1_pfn_wd": Case(
        (4,), {"lr": 1e-2, "weight_decay": 0.1, "score": "pfn", "eps": 1e-3}
    ),
    "two_lora_top1_epd_lr_wd": Case(
        (4, 2),
        {"lr": 3e-2, "lora_lr": 1e-2, "weight_decay": 0.2, "lora_weight_decay": 0.05},
    ),
    "two_lora_top2_epd": Case((4, 2), {"lr": 2e-2, "lora_lr": 1e-2, "top_k": 2}),
    "two_lora_top2_pfn_wd": Case(
        (4, 2),
        {"lr": 2e-2, "lora_lr": 4e-2, "weight_decay": 0.1, "top_k": 2, "score": "pfn", "eps": 1e-3},
        use_rslora=False,
    ),
    "efficient_two_lora_top1_epd": Case(
        (2, 4), {"lr": 1e-2, "lora_lr": 3e-2, "weight_decay": 0.1}, train_base=False
    ),
    "efficient_two_lora_top1_pfn": Case(
        (2, 4), {"lr": 3e-2, "score": "pfn", "eps": 1e-3}, train_base=False
    ),
    "clipped_grads_two_lora_top1": Case(
        (4, 2), {"lr": 3e-2, "lora_lr": 1e-2, "weight_decay": 0.1}, clip_norm=0.05
    ),
    "routed_module_unused_in_some_steps": Case(
        (4, 2), {"lr": 2.5e-2, "lora_lr": 1e-2}, skip={1: ("v_proj",), 3: ("v_proj",)}
    ),
}


def _run_against_reference(case: Case, impl: dict, steps: int = STEPS) -> list[torch.Tensor]:
    model = _build_model(case.lora_ranks, train_base=case.train_base, use_rslora=case.use_rslora)
    opt = molf_ds.MoLFAdamW(model, **impl, **case.opt_kwargs)
    ref = _ReferenceMoLFAdamW(model, **case.opt_kwargs)
    unused_before = {n: p.detach().clone() for n, p in model.unused.named_parameters()}
    history = []
    for step in range(steps):
        opt.zero_grad()
        _backward(model, step, skip=case.skip.get(step, ()))
        if case.clip_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip_norm)
            assert total > case.clip_norm, "the clipping case must actually clip"
        ref_routing = ref.step(_grads(model))
        opt.step()
        _assert_routing_matches(opt, ref_routing, ref, step)
        _assert_matches_reference(model, opt, ref, step)
        history.append(opt.last_routing.winners.clone())
    for name, p in model.unused.named_parameters():
        assert p.grad is None
        assert torch.equal(p, unused_before[name]), f"unused.{name} changed"
        assert p not in opt.state, f"unused.{name} got optimizer state"
    return history


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_step_each_case_matches_float64_reference_every_step(case_name: str, impl: dict) -> None:
    case = CASES[case_name]
    history = torch.stack(_run_against_reference(case, impl))  # [steps, modules, experts]
    # The case must exercise the router: LoRA experts win (so B leaves zero) and, where the
    # base trains, the FFT expert wins too.
    assert history[:, :, 1:].any(), f"no LoRA expert ever won: {history.tolist()}"
    if case.train_base:
        assert history[:, :, 0].any(), f"the FFT expert never won: {history.tolist()}"
    else:
        assert not history[:, :, 0].any()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_from_zero_state_moments_equal_scaled_grads(impl: dict) -> None:
    """From zero state one step gives ``m = (1 - b1) g`` and ``v = (1 - b2) g^2`` for every
    parameter, winner or not, exact up to fp32 rounding of the product."""
    betas = (0.9, 0.999)
    model = _build_model((4, 2))
    opt = molf_ds.MoLFAdamW(model, lr=1e-2, betas=betas, top_k=1, **impl)
    _backward(model, 0)
    grads = _grads(model)
    opt.step()
    for name, p in model.named_parameters():
        g = grads.get(name)
        if g is None:
            continue
        state = opt.state[p]
        for key, expected in (
            ("exp_avg", (1 - betas[0]) * g),
            ("exp_avg_sq", (1 - betas[1]) * g * g),
        ):
            torch.testing.assert_close(
                state[key].double(),
                expected,
                rtol=FIRST_MOMENT_RTOL,
                atol=0.0,
                msg=lambda m, name=name, key=key: f"{name}, {key}: {m}",
            )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_losing_expert_keeps_weights_but_updates_moments(impl: dict) -> None:
    betas = (0.9, 0.999)
    model = _build_model((4, 2))
    opt = molf_ds.MoLFAdamW(model, lr=2e-2, lora_lr=1e-2, betas=betas, top_k=1, **impl)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {
        n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in opt.state
    }
    _backward(model, 1)
    grads = _grads(model)
    opt.step()

    routing = opt.last_routing
    layers = dict(model.named_modules())
    losers_checked = 0
    names = {id(p): n for n, p in model.named_parameters()}
    for row, module_name in enumerate(routing.module_names):
        layer = layers[module_name]
        experts = [[layer.base.weight, layer.base.bias]]
        experts += [[a, b] for a, b in zip(layer.lora_A, layer.lora_B, strict=True)]
        for expert, params in enumerate(experts):
            if routing.winners[row, expert]:
                continue
            for p in params:
                if p is None:
                    continue
                name = names[id(p)]
                assert torch.equal(p, before[name]), f"loser {name} moved"
                expected = betas[0] * moments[name].double() + (1 - betas[0]) * grads[name]
                torch.testing.assert_close(
                    opt.state[p]["exp_avg"].double(),
                    expected,
                    rtol=MOMENT_RTOL,
                    atol=MOMENT_RTOL * float(expected.abs().max()),
                )
                if grads[name].abs().max() > 0:
                    assert not torch.equal(opt.state[p]["exp_avg"], moments[name])
                    losers_checked += 1
    assert losers_checked > 0, "no losing parameter with a non-zero gradient was checked"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_several_steps_one_step_count_for_all_experts(impl: dict) -> None:
    steps = 4
    model = _build_model((4, 2))
    opt = molf_ds.MoLFAdamW(model, lr=2e-2, lora_lr=1e-2, top_k=1, **impl)
    ever_lost = torch.zeros(len(opt.plan.module_names), 3, dtype=torch.bool)
    for step in range(steps):
        opt.zero_grad()
        _backward(model, step)
        opt.step()
        ever_lost |= ~opt.last_routing.winners
    assert ever_lost.all(), "every expert should have lost at least once in this setup"
    for name, p in model.named_parameters():
        if name.startswith("unused."):
            assert p not in opt.state
            continue
        assert int(opt.state[p]["step"]) == steps, f"{name}: step {opt.state[p]['step']}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_efficient_mode_frozen_params_unchanged_and_stateless(impl: dict) -> None:
    model = _build_model((2, 4), train_base=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{m}.{f}.{i}" for m in TARGETS for f in ("lora_A", "lora_B") for i in range(2)
    }
    assert {f"{m}.base.weight" for m in TARGETS} <= set(frozen)
    assert {"embed.weight", "norm.weight", "norm.bias", "head.weight"} <= set(frozen)
    opt = molf_ds.MoLFAdamW(model, lr=1e-1, lora_lr=1e-1, weight_decay=0.5, **impl)
    for step in range(4):
        opt.zero_grad()
        _backward(model, step)
        opt.step()
        assert not opt.last_routing.winners[:, 0].any()
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), f"frozen {name} changed"
        assert params[name] not in opt.state, f"frozen {name} got optimizer state"
    assert all(any(params[n] is p for n in trainable) for p in opt.state)


@pytest.mark.parametrize(
    ("impl", "implementation"), [(FUSED, "fused"), (FOREACH, "foreach")], ids=["fused", "foreach"]
)
def test_step_fast_path_same_grads_matches_reference_path(impl: dict, implementation: str) -> None:
    """The fused C++ kernel or the multi-tensor path against the per-tensor reference, given the
    same gradients for ~5 steps.

    Both optimizers see the gradients of the fast path's model, so any difference is the step's
    own arithmetic (fp32 either way), not a forward pass on slightly different weights.
    """
    kwargs = {"lr": 4e-2, "lora_lr": 1e-2, "weight_decay": 0.1, "lora_weight_decay": 0.02}
    fast_model = _build_model((4, 2), seed=3, d_model=BIG_D_MODEL, hidden=BIG_HIDDEN)
    plain_model = copy.deepcopy(fast_model)
    assert sum(p.numel() for p in fast_model.parameters()) > 3000
    fast_opt = molf_ds.MoLFAdamW(fast_model, **impl, **kwargs)
    plain_opt = molf_ds.MoLFAdamW(plain_model, **REFERENCE, **kwargs)
    seen = torch.zeros(len(fast_opt.plan.module_names), 3, dtype=torch.bool)
    for step in range(STEPS):
        fast_opt.zero_grad()
        plain_opt.zero_grad()
        _backward(fast_model, step)
        for p, q in zip(fast_model.parameters(), plain_model.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        fast_opt.step()
        plain_opt.step()
        fast_routing, plain_routing = fast_opt.last_routing, plain_opt.last_routing
        assert fast_routing.implementation == implementation
        assert plain_routing.implementation == "reference"
        assert torch.equal(fast_routing.winners, plain_routing.winners), f"step {step}"
        torch.testing.assert_close(
            fast_routing.scores, plain_routing.scores, rtol=FUSED_PATH_RTOL, atol=0.0
        )
        seen |= fast_routing.winners
        for (name, p), q in zip(
            fast_model.named_parameters(), plain_model.parameters(), strict=True
        ):
            torch.testing.assert_close(
                p,
                q,
                rtol=FUSED_PATH_RTOL,
                atol=FUSED_PATH_ATOL,
                msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}",
            )
    assert seen[:, 0].any() and seen[:, 1:].any(), f"routing never mixed FFT and LoRA: {seen}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_lr_scheduler_scales_fft_and_lora_lr_together(impl: dict) -> None:
    factors = [1.0, 0.5, 2.0, 0.25, 1.5]
    kwargs = {"lr": 3e-2, "lora_lr": 1e-2, "weight_decay": 0.2, "lora_weight_decay": 0.05}
    model = _build_model((4, 2))
    opt = molf_ds.MoLFAdamW(model, **impl, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: factors[epoch])
    ref = _ReferenceMoLFAdamW(model, **kwargs)
    for step, factor in enumerate(factors):
        assert opt.param_groups[0]["lr"] == pytest.approx(kwargs["lr"] * factor)
        opt.zero_grad()
        _backward(model, step)
        ref_routing = ref.step(_grads(model), lr_factor=factor)
        opt.step()
        _assert_routing_matches(opt, ref_routing, ref, step)
        _assert_matches_reference(model, opt, ref, step)
        if step + 1 < len(factors):
            scheduler.step()


def _train(model: nn.Module, opt: molf_ds.MoLFAdamW, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _backward(model, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_state_dict_resume_bitwise_equal_to_uninterrupted_run(impl: dict) -> None:
    kwargs = {"lr": 2.5e-2, "lora_lr": 1e-2, "weight_decay": 0.1, **impl}
    model = _build_model((4, 2), seed=0)
    opt = molf_ds.MoLFAdamW(model, **kwargs)
    _train(model, opt, range(0, 6))
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    uninterrupted_winners = opt.last_routing.winners.clone()
    uninterrupted_state = {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}

    model = _build_model((4, 2), seed=0)
    opt = molf_ds.MoLFAdamW(model, **kwargs)
    _train(model, opt, range(0, 3))
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    _train(model, opt, range(3, 6))  # the run that then "crashes"
    del model, opt

    resumed = _build_model((4, 2), seed=1)  # another init: everything must come from the files
    resumed.load_state_dict(model_state)
    resumed_opt = molf_ds.MoLFAdamW(resumed, **kwargs)
    resumed_opt.load_state_dict(opt_state)
    _train(resumed, resumed_opt, range(3, 6))
    for name, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[name]), f"{name} differs after resuming"
        if name not in uninterrupted_state:
            assert p not in resumed_opt.state, f"{name} got state after resuming"
            continue
        state, expected = resumed_opt.state[p], uninterrupted_state[name]
        assert int(state["step"]) == int(expected["step"]), name
        assert torch.equal(state["exp_avg"], expected["exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], expected["exp_avg_sq"]), name
    assert torch.equal(resumed_opt.last_routing.winners, uninterrupted_winners)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"top_k": 0}, r"`top_k` must be in \[1, num_experts=2\], got 0", id="top_k_0"),
        pytest.param(
            {"top_k": 3}, r"`top_k` must be in \[1, num_experts=2\], got 3", id="top_k_too_big"
        ),
        pytest.param({"score": "foo"}, r"Invalid `score`: 'foo'", id="unknown_score"),
        pytest.param({"lr": -1e-3}, r"Invalid `lr`", id="negative_lr"),
        pytest.param({"lora_lr": -1e-3}, r"Invalid `lora_lr`", id="negative_lora_lr"),
        pytest.param({"weight_decay": -0.1}, r"Invalid `weight_decay`", id="negative_wd"),
        pytest.param({"betas": (0.9, 1.0)}, r"Invalid `betas`", id="beta2_one"),
        pytest.param({"betas": (-0.1, 0.999)}, r"Invalid `betas`", id="beta1_negative"),
        pytest.param({"betas": (0.9,)}, r"Invalid `betas`", id="one_beta"),
    ],
)
def test_optimizer_invalid_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    model = _build_model((4,))
    with pytest.raises(molf_ds.MoLFConfigError, match=match):
        molf_ds.MoLFAdamW(model, **kwargs)


def test_optimizer_efficient_mode_top_k_counts_lora_experts_only() -> None:
    model = _build_model((2, 4), train_base=False)
    molf_ds.MoLFAdamW(model, top_k=2)
    with pytest.raises(molf_ds.MoLFConfigError, match=r"num_experts=2\], got 3"):
        molf_ds.MoLFAdamW(model, top_k=3)

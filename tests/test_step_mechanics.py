"""How the routed step runs, beyond its numbers: host reads, tie-breaking, determinism, memory.

Expected values come from the contract in DESIGN.md (ties go to the lower expert index; the step
reads one small tensor back to the host), not from the implementation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import molf_ds

IN, HIDDEN, OUT = 24, 40, 12
RANKS = (4, 8)
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model(train_base: bool = True, ranks: tuple[int, ...] = RANKS) -> nn.Module:
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    config = molf_ds.MoLFConfig(
        lora_ranks=ranks, target_modules=("0", "2"), exclude_modules=(), train_base=train_base
    )
    return molf_ds.wrap(model, config)


def _backward(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, IN, generator=generator)
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("fused", [True, False])
def test_step_reads_no_scalar_per_module(fused: bool) -> None:
    """No op that forces a host sync (`.item()`, `bool(tensor)`) runs inside the step."""
    model = _model()
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, fused=fused)
    _backward(model, 0)
    with _OpRecorder() as recorder:
        optimizer.step()
    assert not SYNC_OPS & set(recorder.ops), sorted(SYNC_OPS & set(recorder.ops))
    assert optimizer.last_routing.host_reads == 1
    assert optimizer.last_routing.fused is fused


def test_step_ties_go_to_lower_expert_index() -> None:
    """Zero gradients give every expert the score 0: top-1 must be the FFT expert (index 0),
    top-2 the FFT expert and the first LoRA expert."""
    for top_k, expected in ((1, [True, False, False]), (2, [True, True, False])):
        model = _model()
        optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, top_k=top_k)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        winners = optimizer.last_routing.winners.tolist()
        assert winners == [expected, expected]


def test_step_efficient_mode_never_picks_fft() -> None:
    model = _model(train_base=False)
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2)
    _backward(model, 1)
    optimizer.step()
    routing = optimizer.last_routing
    assert not routing.winners[:, 0].any()
    assert torch.isinf(routing.scores[:, 0]).all()
    assert routing.winners.sum(dim=1).tolist() == [1, 1]


def test_fused_step_same_result_for_any_thread_count() -> None:
    """The kernel adds per-chunk sums in a fixed order, so 1 and 2 threads agree bitwise."""
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = _model(ranks=(4,))
            optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, lora_lr=5e-2, fused=True)
            for step in range(3):
                _backward(model, step)
                optimizer.step()
                optimizer.zero_grad()
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_optimizer_state_is_two_moments_per_parameter() -> None:
    model = _model()
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2)
    _backward(model, 2)
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(optimizer.state) == set(trainable)
    for p in trainable:
        state = optimizer.state[p]
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert not isinstance(state["step"], torch.Tensor)

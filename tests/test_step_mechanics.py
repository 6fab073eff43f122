"""How the routed step runs, beyond its numbers: host reads, tie-breaking, determinism, memory.

Expected values come from the contract in docs/design.md (ties go to the lower expert index; the
step reads one small tensor back to the host), not from the implementation; host reads are
measured with `molf_ds.testing.HostReadCounter`, which sees on the CPU what would be a
device-to-host synchronisation on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import molf_ds
from molf_ds import cpu_kernel, routed_step
from molf_ds.testing import DispatchedOps, HostReadCounter, TransientMemory
from molf_ds.testing.host_reads import _device_to_host

IN, HIDDEN, OUT = 24, 40, 12
RANKS = (4, 8)


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


IMPLEMENTATIONS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "reference": {"fused": False, "foreach": False},
}


# The step's one read of the winners from Python: the multi-tensor and reference passes list
# the chosen segments; the CPU kernel takes the (host) mask as it lies, with no read from Python.
WINNER_READS = {"fused": [], "foreach": ["Tensor.tolist"], "reference": ["Tensor.tolist"]}


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_step_makes_one_host_read(implementation: str) -> None:
    """The winner mask, read once per step -- no `.item()`, `bool(tensor)` or copy per module."""
    model = _model()
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, **IMPLEMENTATIONS[implementation])
    for step in range(2):  # the first step also creates the moments
        _backward(model, step)
        with HostReadCounter() as reads:
            optimizer.step()
        assert reads.reads == WINNER_READS[implementation], reads.reads
        optimizer.zero_grad()
    assert optimizer.last_routing.implementation == implementation


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_host_read_counter_sees_a_read_added_to_the_step(monkeypatch, implementation: str) -> None:
    def top_k_with_a_read(scores, candidates, top_k):
        winners = top_k_winners(scores, candidates, top_k)
        _ = bool(winners.any())  # a read of its own
        return winners

    top_k_winners = routed_step.top_k_winners
    monkeypatch.setattr(routed_step, "top_k_winners", top_k_with_a_read)
    model = _model()
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, **IMPLEMENTATIONS[implementation])
    _backward(model, 0)
    with HostReadCounter() as reads:
        optimizer.step()
    assert reads.reads == ["Tensor.__bool__", *WINNER_READS[implementation]]


def test_host_read_counter_counts_each_read_once() -> None:
    t, scalar, mask = torch.tensor([1.0, 2.0]), torch.tensor(3.0), torch.tensor([True, False])
    reads = {
        "Tensor.item": lambda: scalar.item(),
        "Tensor.__bool__": lambda: bool(mask.any()),
        "Tensor.__int__": lambda: int(scalar),
        "Tensor.__float__": lambda: float(scalar),
        "Tensor.__index__": lambda: [0, 1, 2][torch.tensor(1)],
        "Tensor.tolist": lambda: mask.cpu().tolist(),  # .cpu() of a CPU tensor moves nothing
        "Tensor.numpy": lambda: t.numpy(),
        "Tensor.__array__": lambda: np.asarray(t),
        "Tensor.__format__": lambda: f"{scalar:.2f}",
        "Tensor.__repr__": lambda: repr(t),
        "aten.equal": lambda: torch.equal(t, t),
        "aten.allclose": lambda: torch.allclose(t, t),
        "aten.nonzero": lambda: mask.nonzero(),
        "aten.index": lambda: t[mask],
        "aten.index_put_": lambda: t.clone().__setitem__(mask, 0.0),
        "aten.repeat_interleave": lambda: t.repeat_interleave(torch.tensor([1, 2])),
    }
    for expected, read in reads.items():
        with HostReadCounter() as counter:
            read()
        assert counter.reads == [expected]
    no_reads = [
        lambda: t.cpu(),
        lambda: (t * 2).sum().sqrt(),
        lambda: t[torch.tensor([1])],
        lambda: t.masked_fill(mask, 0.0),
        lambda: list(t),  # unbind: tensors, not values
        lambda: t.repeat_interleave(torch.tensor([1, 2]), output_size=3),
    ]
    for work in no_reads:
        with HostReadCounter() as counter:
            work()
        assert counter.count == 0, counter.reads
    # A copy from an accelerator into CPU memory is a read (meta stands in for the device here).
    assert _device_to_host((torch.empty(2, device="meta"),), torch.empty(2))
    assert not _device_to_host((t,), torch.empty(2))


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


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_grad_factor_equals_multiplying_the_gradients_first(implementation: str) -> None:
    """A step with ``grad_factor`` f (a ZeRO wrapper's clip factor, applied as the kernel reads
    each gradient) leaves bitwise what the same step leaves after ``grad.mul_(f)`` over every
    gradient, the separate pass the wrapper skips, and the same winners; not what it leaves
    without the factor."""
    factor = torch.tensor(1.0 / 3.7)  # as DeepSpeed's ``1. / combined_scale``: a float32 value
    results = {}
    for how in ("folded", "multiplied", "unscaled"):
        torch.manual_seed(0)
        model = _model()
        optimizer = molf_ds.MoLFAdamW(
            model, lr=1e-2, lora_lr=5e-2, **IMPLEMENTATIONS[implementation]
        )
        winners = []
        for step in range(3):
            _backward(model, step)
            if how == "folded":
                optimizer.grad_factor = factor.item()
            elif how == "multiplied":
                for p in model.parameters():
                    p.grad.mul_(factor)
            optimizer.step()
            optimizer.zero_grad()
            winners.append(optimizer.last_routing.winners)
        assert optimizer.last_routing.implementation == implementation
        results[how] = ([p.detach().clone() for p in model.parameters()], winners)
    (folded, folded_winners), (multiplied, winners) = results["folded"], results["multiplied"]
    assert all(torch.equal(a, b) for a, b in zip(folded, multiplied, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(folded_winners, winners, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folded, results["unscaled"][0], strict=True))


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


def _deep_model(layers: int) -> nn.Module:
    """``layers`` routed linear layers: 10x the layers is 10x the segments."""
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(IN, IN), nn.Tanh()]
    config = molf_ds.MoLFConfig(lora_ranks=RANKS, target_modules=r"\d+", exclude_modules=())
    return molf_ds.wrap(nn.Sequential(*blocks), config)


def _ops_of_second_step(model: nn.Module, **impl) -> int:
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, **impl)
    _backward_deep(model)
    optimizer.step()  # the first step creates the state
    with DispatchedOps() as ops:
        optimizer.step()
    return ops.count


def _backward_deep(model: nn.Module) -> None:
    model(torch.randn(8, IN, generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()


def test_foreach_step_dispatches_the_same_ops_for_ten_times_the_layers() -> None:
    """The multi-tensor path's op count does not grow with the number of segments (what becomes
    kernel launches on an accelerator), where the per-tensor reference's does."""
    small, large = _deep_model(2), _deep_model(20)
    assert sum(1 for _ in large.parameters()) >= 10 * sum(1 for _ in small.parameters()) - 2
    foreach = {"foreach": True}
    assert _ops_of_second_step(small, **foreach) == _ops_of_second_step(large, **foreach)
    reference = {"fused": False, "foreach": False}
    assert _ops_of_second_step(large, **reference) > 5 * _ops_of_second_step(small, **reference)


def _step_in_chunks(monkeypatch, optimizer: torch.optim.Optimizer, chunk_bytes: int) -> int:
    """One step of ``optimizer`` with CPU chunks of ``chunk_bytes``; its transient peak."""
    monkeypatch.setitem(routed_step.CHUNK_BYTES, "cpu", chunk_bytes)
    with TransientMemory() as memory:
        optimizer.step()
    monkeypatch.undo()
    return memory.peak


def test_foreach_step_chunks_bound_transient_memory(monkeypatch) -> None:
    """Temporaries come in chunks: the transient peak stays below one chunk plus the small
    per-step tensors, and chunking changes no result."""
    chunk_bytes = 4096
    model = _deep_model(12)
    twin = _deep_model(12)
    twin.load_state_dict(model.state_dict())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    small_tensors = 8 * 1024  # scores, partial sums, winner masks of ~50 segments
    whole = molf_ds.MoLFAdamW(twin, lr=1e-2, foreach=True)
    chunked = molf_ds.MoLFAdamW(model, lr=1e-2, foreach=True)
    for step in range(3):
        for m in (model, twin):
            m.zero_grad()
            _backward_deep(m)
        whole.step()
        peak = _step_in_chunks(monkeypatch, chunked, chunk_bytes)
        if step > 0:  # the first step allocates the persistent moments
            assert peak <= chunk_bytes + small_tensors, peak
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    whole_peak = TransientMemory()
    with whole_peak:
        whole.step()
    assert whole_peak.peak > max(chunk_bytes, largest) + small_tensors, "chunking had no effect"


def test_foreach_step_splits_a_segment_larger_than_a_chunk(monkeypatch) -> None:
    """A parameter far larger than a chunk is cut into flat slices: the transient peak stays
    below one chunk plus the small per-step tensors, not twice the parameter, and the scores,
    winners and parameters equal those of the same step taken whole."""
    chunk_bytes = 16 * 1024

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = molf_ds.MoLFConfig(lora_ranks=RANKS, target_modules=r"\d+", exclude_modules=())
        return molf_ds.wrap(
            nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8)), config
        )

    model, twin = build(), build()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert largest >= 16 * chunk_bytes
    small_tensors = 8 * 1024
    whole = molf_ds.MoLFAdamW(twin, lr=1e-2, lora_lr=3e-2, foreach=True)
    split = molf_ds.MoLFAdamW(model, lr=1e-2, lora_lr=3e-2, foreach=True)
    for step in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(torch.randn(4, 256, generator=torch.Generator().manual_seed(step))).pow(
                2
            ).mean().backward()
        whole.step()
        peak = _step_in_chunks(monkeypatch, split, chunk_bytes)
        if step > 0:  # the first step allocates the persistent moments
            assert peak <= chunk_bytes + small_tensors, peak
        assert torch.equal(split.last_routing.winners, whole.last_routing.winners)
        # a 2-norm over 65,536 terms and the same over 16 slices round differently in float32
        # (up to 6e-7 seen here), not more
        torch.testing.assert_close(
            split.last_routing.scores, whole.last_routing.scores, rtol=1e-5, atol=0.0
        )
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class _HostToDevice(TorchFunctionMode):
    """Calls that move or build a tensor from host data: on an accelerator each is a copy."""

    NAMES = frozenset({"to", "cpu", "cuda", "copy_", "tensor", "as_tensor"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _transfers_of_second_step(model: nn.Module) -> tuple[list[str], list[tuple]]:
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, foreach=True)
    reduced = []  # what reaches the cross-rank reduction (here: over one rank, nothing to add)
    optimizer.reduce_scores = lambda scores: reduced.append((tuple(scores.shape), scores.dtype))
    _backward_deep(model)
    optimizer.step()
    reduced.clear()
    with _HostToDevice() as moves:
        optimizer.step()
    return moves.calls, reduced


def test_foreach_step_reduces_scores_once_and_copies_nothing_per_segment() -> None:
    """The multi-tensor path's host-device traffic and its one reduction do not grow with the
    number of segments: the ``[modules x experts]`` score sums reach ``reduce_scores`` once per
    step (with NCCL and offloaded partitions, the one trip to the GPU and back), and the tensors
    it builds on the host and moves are a fixed few per step."""
    small, large = _deep_model(2), _deep_model(20)
    small_moves, small_reduced = _transfers_of_second_step(small)
    large_moves, large_reduced = _transfers_of_second_step(large)
    assert small_reduced == [((2, 3), torch.float64)]
    assert large_reduced == [((20, 3), torch.float64)]
    assert small_moves == large_moves and 0 < len(large_moves) <= 10, large_moves


def test_foreach_scores_of_bf16_segments_keep_float32_sums() -> None:
    """bf16 segments: each element's score term rounds to bf16, but the sums must not (a bf16
    sum keeps three digits). Expected: the float64 sums of the bf16 moments the step wrote."""
    generator = torch.Generator().manual_seed(0)

    def segment(expert: int, lr: float) -> routed_step.Segment:
        grad = (torch.randn(8192, generator=generator) * 1e-3).to(torch.bfloat16)
        zeros = torch.zeros_like(grad)
        return routed_step.Segment(
            param=zeros.clone(),
            grad=grad,
            exp_avg=zeros.clone(),
            exp_avg_sq=zeros.clone(),
            module=0,
            expert=expert,
            lr=lr,
            weight_decay=0.0,
            step=1,
        )

    segments = [segment(0, 1e-3), segment(1, 2e-3)]
    table = routed_step.RoutingTable(expert_numel=[[8192, 8192]], candidates=[[True, True]])
    for score in routed_step.SCORES:
        for s in segments:
            s.exp_avg.zero_()
            s.exp_avg_sq.zero_()
        decision = routed_step.routed_adamw(
            segments, table, beta1=0.9, beta2=0.999, eps=1e-8, score=score, top_k=1, foreach=True
        )
        expected = []
        for s in segments:
            m, v = s.exp_avg.double(), s.exp_avg_sq.double()
            if score == "epd":
                expected.append(s.lr / 8192 * float((m * m / (v.sqrt() + 1e-8)).sum()))
            else:
                expected.append(float(((m / (v.sqrt() + 1e-8)) ** 2).sum() / 8192) ** 0.5)
        # the terms' own bf16 rounding leaves 3e-4 here; sums in bf16 would leave 4e-3
        torch.testing.assert_close(
            decision.scores[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-3, atol=0.0
        )


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_a_step_over_no_segments_still_routes(implementation: str) -> None:
    """A caller whose process holds no segment (e.g. a rank with nothing of a partition) still
    gets a decision and makes its one score reduction, so the other ranks are not left waiting."""
    reduced = []
    table = routed_step.RoutingTable(expert_numel=[[4, 2]], candidates=[[False, False]])
    decision = routed_step.routed_adamw(
        [],
        table,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        score="epd",
        top_k=1,
        reduce_scores=reduced.append,
        **IMPLEMENTATIONS[implementation],
    )
    assert len(reduced) == 1 and tuple(reduced[0].shape) == (1, 2)
    assert not decision.winners.any()


def test_a_rank_without_segments_joins_the_score_reduction() -> None:
    """Under ZeRO a rank may hold no slice of any parameter (a partition of padding only): its
    step must still make the one reduction the other ranks wait in, and change nothing. Alone
    (no reduction set), a step without gradients does nothing, as torch's AdamW."""
    model = _model()
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # no gradients, one process
    assert optimizer.last_routing is None
    reduced = []
    optimizer.reduce_scores = reduced.append
    optimizer.segment_source = lambda opt, group: ([], [[True] * 3 for _ in range(2)])
    optimizer.step()
    assert len(reduced) == 1 and tuple(reduced[0].shape) == (2, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert optimizer.state == {}


def test_flat_segments_cut_the_pieces_given_in_their_order() -> None:
    """ZeRO's segment sources cut a flat partition's pieces with one split per tensor: each
    segment is the ``narrow`` view of its piece in all four tensors (pieces out of order, gaps
    between them and at both ends), whatever order the pieces lie in."""
    from molf_ds.optimizer import flat_segments
    from molf_ds.plan import ParamRole

    flat = torch.arange(40, dtype=torch.float32)
    flat.grad = -flat
    state = {"exp_avg": flat * 10, "exp_avg_sq": flat * 100, "step": 3}
    group = {"lr": 0.5, "lora_lr_ratio": 2.0, "weight_decay": 0.1, "lora_weight_decay": 0.01}
    fft, lora = ParamRole(0, 0, False, True), ParamRole(0, 1, True, True)
    pieces = [(lora, 30, 5), (fft, 2, 10), (fft, 12, 3), (lora, 20, 1)]
    segments = flat_segments(group, flat, state, pieces)
    assert len(segments) == len(pieces)
    for s, (role, start, numel) in zip(segments, pieces, strict=True):
        for got, whole in zip(
            (s.param, s.grad, s.exp_avg, s.exp_avg_sq),
            (flat, flat.grad, state["exp_avg"], state["exp_avg_sq"]),
            strict=True,
        ):
            assert got.data_ptr() == whole.narrow(0, start, numel).data_ptr()
            assert torch.equal(got, whole.narrow(0, start, numel))
        assert (s.expert, s.step) == (role.expert, 3)
        assert s.lr == (1.0 if role.is_lora else 0.5)
        assert s.weight_decay == (0.01 if role.is_lora else 0.1)
    with pytest.raises(ValueError, match="overlap at element 14"):
        flat_segments(group, flat, state, [(fft, 2, 13), (fft, 14, 2)])
    with pytest.raises(ValueError, match="ends at element 41, past the partition's 40"):
        flat_segments(group, flat, state, [(fft, 38, 3)])


class _TensorSubclass(torch.Tensor):
    """A tensor type the kernel does not know (as FSDP2's DTensor once was)."""


ODD_TENSORS = {
    "float64": lambda t: t.double(),
    "strided": lambda t: t.t(),
    "subclass": lambda t: t.as_subclass(_TensorSubclass),
    "meta": lambda t: t.to("meta"),
    "fake": lambda t: FakeTensorMode().from_tensor(t),
    "sparse": lambda t: t.to_sparse(),
}


@pytest.mark.parametrize("field", ["param", "grad", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("odd", list(ODD_TENSORS))
def test_the_kernel_runs_only_where_every_tensor_suits_it(field: str, odd: str) -> None:
    """The CPU kernel reads raw float32 memory, so any one tensor of any segment that is not a
    plain, dense, contiguous float32 CPU tensor -- a subclass, a fake or meta tensor included --
    sends ``fused=None`` to the multi-tensor path and makes ``fused=True`` an error, never a
    read of the wrong memory."""

    def segment() -> routed_step.Segment:
        tensors = {name: torch.zeros(6, 4) for name in ("param", "grad", "exp_avg", "exp_avg_sq")}
        return routed_step.Segment(**tensors, module=0, expert=0, lr=1e-3, weight_decay=0.0, step=1)

    segments = [segment(), segment()]
    assert routed_step.choose_implementation(segments, fused=None, foreach=None) == "fused"
    setattr(segments[1], field, ODD_TENSORS[odd](getattr(segments[1], field)))
    assert routed_step.choose_implementation(segments, fused=None, foreach=None) == "foreach"
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
        routed_step.choose_implementation(segments, fused=True, foreach=None)


def test_the_kernel_refuses_a_dtensor(tmp_path) -> None:
    """FSDP2's parameters are DTensors, whose device and dtype are their shard's: the kernel
    once read one as raw memory and crashed. `MoLFAdamW` hands it their local shards instead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = DTensor.from_local(torch.zeros(6, 4), mesh, [Shard(0)])
        assert sharded.is_cpu and sharded.dtype == torch.float32 and sharded.is_contiguous()
        assert not cpu_kernel.kernel_can_read(sharded)
        assert cpu_kernel.kernel_can_read(sharded.to_local())
    finally:
        torch.distributed.destroy_process_group()


def test_the_kernel_batch_refuses_arguments_it_would_read_past() -> None:
    """The kernel's batch hands raw addresses to C: per-segment lists of the wrong length, or a
    winner mask that is not one CPU bool per segment, are refused before any call."""
    tensors = {name: torch.ones(8) for name in ("param", "grad", "exp_avg", "exp_avg_sq")}
    segment = routed_step.Segment(**tensors, module=0, expert=0, lr=1.0, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="every per-segment list must have 1 entries"):
        cpu_kernel.Batch([segment], [0], [1.0], [0.1], [])
    # decay 1, step size 0.1, sqrt(1 - b2^t) = 1: a chosen segment moves by -0.1 m / (sqrt(v) + eps)
    batch = cpu_kernel.Batch([segment], [0], [1.0], [0.1], [1.0])
    for mask in (torch.ones(2, dtype=torch.bool), torch.ones(1), torch.ones(1, dtype=torch.int8)):
        with pytest.raises(ValueError, match="must be 1 bools on the CPU"):
            batch.apply_update(mask, eps=0.0)
    batch.apply_update(torch.zeros(1, dtype=torch.bool), eps=0.0)
    assert torch.equal(segment.param, torch.ones(8))
    batch.apply_update(torch.ones(1, dtype=torch.bool), eps=0.0)
    torch.testing.assert_close(segment.param, torch.full((8,), 0.9))


def test_the_kernel_copies_exactly_the_spans_it_is_given() -> None:
    """ZeRO-Offload's copy-back on CPU ranks: every span (across several of the kernel's
    chunks, and an empty one) is copied and nothing between them; spans outside the tensors,
    or tensors the kernel cannot read, are refused before any call."""
    source = torch.arange(40_000, dtype=torch.float32)
    target = torch.full((40_000,), -1.0)
    spans = [(3, 5), (100, 0), (1_000, 35_000)]  # the last spans three chunks of 16384
    cpu_kernel.copy_spans(target, source, spans)
    expected = torch.full((40_000,), -1.0)
    for start, numel in spans:
        expected[start : start + numel] = source[start : start + numel]
    assert torch.equal(target, expected)
    with pytest.raises(ValueError, match="outside the 40000 elements"):
        cpu_kernel.copy_spans(target, source, [(39_999, 2)])
    for odd in (source.double(), torch.arange(80_000.0)[::2], source[:10]):
        with pytest.raises(ValueError, match="contiguous float32 CPU tensors of one size"):
            cpu_kernel.copy_spans(target, odd, spans)

"""The routed AdamW step, written once over *segments*.

A segment is a contiguous 1-D view of parameter, gradient and moment storage, tagged with the
``(module, expert)`` it belongs to. The same function serves every memory layout: one segment per
parameter in a single process, per-parameter slices of a flat ZeRO partition, CPU-offloaded
partitions. It imports torch only; a cross-rank reduction reaches it as ``reduce_scores``.

Algorithm (one call = one optimizer step; ``t`` is each segment's step count, already advanced)::

    for every segment:                                   # all experts, winners or not
        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        if the segment is unrouted: update p (below)     # it waits for no routing: same pass
    for every routed (module, expert) e with N_e parameters:
        EPD: S_e = lr_e / N_e * sum(m^2 / (sqrt(v) + eps))
        PFN: S_e = sqrt(sum((m / (sqrt(v) + eps))^2) / N_e)
    reduce_scores(S)                                     # e.g. all_reduce(SUM) of the partial sums
    winners = top_k(S) per module                        # ties: lower expert index first
    for every segment of a winner:
        p <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Three implementations share this signature, chosen by `choose_implementation` the way torch's
AdamW chooses between its ``fused``, ``foreach`` and for-loop paths: the fused CPU kernel (two
SIMD + OpenMP passes over host memory), the multi-tensor path (``torch._foreach_*`` ops over
lists of segments grouped by device and dtype, in chunks of bounded size, so the number of ops a
step dispatches does not grow with the number of segments — what matters on an accelerator), and
the reference (tensor ops per segment, the readable version the other two are tested against).

The only device-to-host read is, once per step, whether each segment's expert won (a bool per
segment, gathered on the device from the ``[modules x experts]`` winners; measured with
`molf_ds.testing.HostReadCounter` by the tests and ``bench/optimizer_step.py``).
"""

from __future__ import annotations

import array
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from molf_ds import cpu_kernel

UNROUTED = -1
"""``Segment.module`` of parameters outside routed modules: plain AdamW, always updated."""

SCORES = ("epd", "pfn")

CHUNK_BYTES = {"cpu": 2 * 2**20}
"""The multi-tensor path's temporary per chunk of segments, by device type (larger contiguous
segments are cut into flat slices): a step's transient memory stays below it, however large a
parameter is.

On the CPU a chunk's gradients, moments, parameters and temporary (about 5 x 2 MiB) stay in the
last-level cache between one op and the next, so only a chunk's first touch of each tensor goes
to memory: 1.5-2x faster than chunks that spill (``bench/optimizer_step.py --impl foreach``). On
an accelerator every op is a kernel launch, so chunks are large (`DEFAULT_CHUNK_BYTES`) and a
step's op count does not grow with the number of segments."""
DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass(slots=True)  # hundreds are made every step: slots make them cheaper to build and read
class Segment:
    """A contiguous piece of one parameter and its state: a whole parameter, or a 1-D slice of a
    flat partition.

    ``param``, ``grad``, ``exp_avg`` and ``exp_avg_sq`` have the same shape; ``param`` and the
    moments are updated in place. ``step`` is the count after this step's increment.
    """

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    module: int
    expert: int
    lr: float
    weight_decay: float
    step: int


@dataclass(frozen=True)
class RoutingTable:
    """What the router needs to know about each ``(module, expert)`` beyond the segments.

    Attributes:
        expert_numel: ``N_e`` for each module and expert: the expert's *whole* parameter count,
            also when this rank holds only slices of it.
        candidates: whether each expert may win this step.
    """

    expert_numel: Sequence[Sequence[int]]
    candidates: Sequence[Sequence[bool]]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.expert_numel), len(self.expert_numel[0]) if self.expert_numel else 0


@dataclass
class RoutingDecision:
    """The outcome of one routed step.

    Attributes:
        scores: ``[modules, experts]`` float64 on the parameters' device (``-inf`` where an
            expert was not a candidate).
        winners: ``[modules, experts]`` bool on the parameters' device.
        implementation: which path ran: ``"fused"`` (the CPU kernel), ``"foreach"`` (the
            multi-tensor path) or ``"reference"``.
    """

    scores: torch.Tensor
    winners: torch.Tensor
    implementation: str

    @property
    def fused(self) -> bool:
        """Whether the fused CPU kernel ran."""
        return self.implementation == "fused"


def routed_adamw(
    segments: Sequence[Segment],
    table: RoutingTable,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    score: str,
    top_k: int,
    reduce_scores: Callable[[torch.Tensor], None] | None = None,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> RoutingDecision:
    """One routed AdamW step over ``segments`` (see the module docstring for the math).

    Args:
        segments: every segment this process owns, routed and unrouted.
        table: ``N_e`` and candidate flags for each ``(module, expert)``.
        score: ``"epd"`` or ``"pfn"``.
        top_k: winners per module.
        reduce_scores: called once on the ``[modules, experts]`` float64 partial sums, in place
            (an all-reduce over the data-parallel group); ``None`` in a single process.
        fused, foreach: which implementation runs (`choose_implementation`).
    """
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    device = segments[0].param.device if segments else torch.device("cpu")
    implementation = _IMPLEMENTATIONS[choose_implementation(segments, fused=fused, foreach=foreach)]
    # Everything a step needs to know per segment is read here, in sweeps over the segments
    # before pass 1: afterwards the passes and the routing touch only a few small tensors.
    cells, weights = _score_cells(segments, table, score, device)
    batch = implementation.prepare(segments, beta1=beta1, beta2=beta2, score=score)

    partials = implementation.moments(batch, beta1=beta1, beta2=beta2, eps=eps, score=score)
    scores = _expert_scores(partials, cells, weights, table.shape)
    if reduce_scores is not None:
        reduce_scores(scores)
    if score == "pfn":
        scores = scores.sqrt()
    candidates = torch.tensor(table.candidates, dtype=torch.bool).to(device, non_blocking=True)
    scores = scores.masked_fill(~candidates, -math.inf)
    winners = top_k_winners(scores, candidates, top_k)

    # whether each segment's expert won (unrouted segments point at an extra cell that never
    # wins): the step's one device-to-host read
    chosen = torch.cat([winners.view(-1), winners.new_zeros(1)])[cells].cpu()
    implementation.update(batch, chosen, beta1=beta1, beta2=beta2, eps=eps)
    return RoutingDecision(scores=scores, winners=winners, implementation=implementation.name)


def choose_implementation(
    segments: Sequence[Segment], *, fused: bool | None, foreach: bool | None
) -> str:
    """``"fused"``, ``"foreach"`` or ``"reference"``, as torch's AdamW reads the same flags.

    ``fused=True`` requires the CPU kernel (contiguous float32 CPU tensors and a C++ compiler);
    ``foreach=True`` the multi-tensor path; both ``False`` the reference. Left at ``None``, the
    kernel runs where every segment allows it, else the multi-tensor path (or the reference, if
    ``foreach=False``).
    """
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot both be True: choose one")
    if foreach:
        return "foreach"
    if fused is not False and _use_cpu_kernel(segments, fused):
        return "fused"
    return "reference" if foreach is False else "foreach"


def top_k_winners(scores: torch.Tensor, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` highest-scoring candidates of each row; ties go to the lower index.

    Written as a rank count rather than ``torch.topk``, whose tie order is unspecified, so every
    rank and every device breaks ties the same way.
    """
    num_experts = scores.shape[-1]
    index = torch.arange(num_experts, device=scores.device)
    mine, other = scores.unsqueeze(-1), scores.unsqueeze(-2)
    other_first = index.view(1, 1, -1) < index.view(1, -1, 1)
    beats = ((other > mine) | ((other == mine) & other_first)) & candidates.unsqueeze(-2)
    return candidates & (beats.sum(-1) < top_k)


def _use_cpu_kernel(segments: Sequence[Segment], fused: bool | None) -> bool:
    if fused is False:
        return False
    # Every tensor is checked: the kernel reads raw memory, so one float64 moment or CUDA
    # gradient must mean another path, never a wrong read. (`is_cpu` builds no torch.device.)
    suitable = all(
        t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()
        for s in segments
        for t in (s.param, s.grad, s.exp_avg, s.exp_avg_sq)
    )
    if fused is None:
        return suitable and cpu_kernel.available()
    if not suitable:
        raise ValueError(
            "`fused=True` needs contiguous float32 CPU tensors; use fused=None to fall back"
        )
    cpu_kernel.load()  # raises KernelUnavailable with the compiler's message
    return True


def _score_cells(
    segments: Sequence[Segment], table: RoutingTable, score: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each segment's partial score sum goes and its weight, as tensors on ``device``.

    Segment ``i`` adds ``weights[i] * partial[i]`` into cell ``cells[i]`` of the flattened
    ``[modules, experts]`` table; unrouted segments go to one extra cell past its end."""
    num_modules, num_experts = table.shape
    expert_numel, epd = table.expert_numel, score == "epd"
    spare = num_modules * num_experts
    # EPD's lr_e / N_e is linear, so it can be applied before the cross-rank sum.
    rows = [
        (spare, 0.0)
        if s.module == UNROUTED
        else (
            s.module * num_experts + s.expert,
            (s.lr if epd else 1.0) / expert_numel[s.module][s.expert],
        )
        for s in segments
    ]
    cells, weights = cpu_kernel.columns(rows, 2)
    return _on(device, "q", cells), _on(device, "d", weights)


def _expert_scores(
    partials: torch.Tensor, cells: torch.Tensor, weights: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Each ``(module, expert)``'s weighted sum of its segments' partial sums."""
    flat = torch.zeros(shape[0] * shape[1] + 1, dtype=torch.float64, device=weights.device)
    flat.index_add_(0, cells, partials * weights)
    return flat[:-1].view(shape)


def _on(device: torch.device, typecode: str, values: Sequence) -> torch.Tensor:
    """``values`` as a tensor on ``device``, through `array` (faster than torch.tensor of a
    list of a few hundred numbers, which this step would pay every time)."""
    dtype = _TYPECODES[typecode]
    if not values:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.frombuffer(array.array(typecode, values), dtype=dtype).to(device)


_TYPECODES = {"q": torch.int64, "d": torch.float64}


def _reference_moments(
    segments: Sequence[Segment], *, beta1: float, beta2: float, eps: float, score: str
) -> torch.Tensor:
    """Pass 1 with plain tensor ops: the readable reference the fused kernel is tested against."""
    partials = []
    for s in segments:
        s.exp_avg.mul_(beta1).add_(s.grad, alpha=1 - beta1)
        s.exp_avg_sq.mul_(beta2).addcmul_(s.grad, s.grad, value=1 - beta2)
        if s.module == UNROUTED:
            _reference_update([s], beta1=beta1, beta2=beta2, eps=eps)
            partials.append(torch.zeros((), dtype=torch.float64, device=s.param.device))
            continue
        # One temporary the size of the segment: denom becomes the score term in place.
        term = s.exp_avg_sq.sqrt().add_(eps)
        torch.div(s.exp_avg, term, out=term)
        if score == "epd":
            term.mul_(s.exp_avg)
        else:
            term.square_()
        partials.append(term.sum().double())
        del term  # free before the next segment allocates its own
    if not partials:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(partials)


def _reference_update(
    segments: Sequence[Segment], *, beta1: float, beta2: float, eps: float
) -> None:
    for s in segments:
        decay, step_size, bc2_sqrt = _update_scalars(s, beta1, beta2)
        s.param.mul_(decay)
        denom = s.exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps)
        s.param.addcdiv_(s.exp_avg, denom, value=-step_size)
        del denom  # free before the next segment allocates its own


def _kernel_batch(
    segments: Sequence[Segment], *, beta1: float, beta2: float, score: str
) -> cpu_kernel.Batch:
    kind = SCORES.index(score)
    rows = [
        (-1 if s.module == UNROUTED else kind, *_update_scalars(s, beta1, beta2)) for s in segments
    ]
    return cpu_kernel.Batch(segments, *cpu_kernel.columns(rows, 4))


def _kernel_moments(
    batch: cpu_kernel.Batch, *, beta1: float, beta2: float, eps: float, score: str
) -> torch.Tensor:
    return batch.moments_and_partials(beta1=beta1, beta2=beta2, eps=eps)


def _kernel_update(
    batch: cpu_kernel.Batch, chosen: torch.Tensor, *, beta1: float, beta2: float, eps: float
) -> None:
    batch.apply_update(chosen, eps=eps)


def _foreach_moments(
    segments: Sequence[Segment], *, beta1: float, beta2: float, eps: float, score: str
) -> torch.Tensor:
    """Pass 1 as multi-tensor ops: the same arithmetic as `_reference_moments`, one op per list.

    Written for the bytes each op streams (what bounds a step on any device): ``m`` moves by one
    lerp (as in torch's AdamW), and each score is a squared 2-norm, so one temporary and one
    reduction serve all pieces at once: with ``d = sqrt(v) + eps``, EPD sums
    ``(m d^-1/2)^2 = m^2/d`` and PFN sums ``(m/d)^2``.
    """
    device = segments[0].param.device if segments else torch.device("cpu")
    # each piece's norm and its segment, by dtype: gathered once per step, not once per chunk
    norms: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
    for chunk in _chunks(segments):
        grads, exp_avgs, exp_avg_sqs = (
            [piece.view(field) for piece in chunk] for field in ("grad", "exp_avg", "exp_avg_sq")
        )
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        routed = [k for k, piece in enumerate(chunk) if piece.segment.module != UNROUTED]
        if len(routed) < len(chunk):  # unrouted pieces: their update, while still in cache
            _foreach_update_pieces(
                [piece for piece in chunk if piece.segment.module == UNROUTED], beta1, beta2, eps
            )
        if not routed:
            continue
        terms = torch._foreach_sqrt([exp_avg_sqs[k] for k in routed])
        torch._foreach_add_(terms, eps)
        torch._foreach_pow_(terms, -0.5 if score == "epd" else -1.0)
        torch._foreach_mul_(terms, [exp_avgs[k] for k in routed])
        # a bf16/fp16 norm would keep 3 digits of the sum: reduce those in float32
        wide = torch.float32 if terms[0].element_size() < 4 else None
        values, owners = norms.setdefault(wide or terms[0].dtype, ([], []))
        values += torch._foreach_norm(terms, 2, **({"dtype": wide} if wide else {}))
        owners += [chunk[k].index for k in routed]
        del terms
    partials = torch.zeros(len(segments), dtype=torch.float64, device=device)
    for values, owners in norms.values():
        sums = torch.stack(values).double().square()
        # a split segment's pieces add up
        partials.index_add_(0, torch.tensor(owners, device=device), sums)
    return partials


def _foreach_update(segments: Sequence[Segment], *, beta1: float, beta2: float, eps: float) -> None:
    """Pass 2 as multi-tensor ops: `_reference_update`'s update with the bias correction moved
    out of the denominator, ``m / (sqrt(v)/c + eps) = c m / (sqrt(v) + c eps)`` with
    ``c = sqrt(1 - b2^t)``, which saves one pass over the temporary (equal up to fp32 rounding)."""
    for chunk in _chunks(segments):
        _foreach_update_pieces(chunk, beta1, beta2, eps)


def _foreach_update_pieces(chunk: list[_Piece], beta1: float, beta2: float, eps: float) -> None:
    params, exp_avgs, exp_avg_sqs = (
        [piece.view(field) for piece in chunk] for field in ("param", "exp_avg", "exp_avg_sq")
    )
    decays, step_sizes, bc2_sqrts = zip(
        *(_update_scalars(piece.segment, beta1, beta2) for piece in chunk), strict=True
    )
    if any(decay != 1.0 for decay in decays):
        torch._foreach_mul_(params, list(decays))
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, [eps * c for c in bc2_sqrts])
    scaled = [-size * c for size, c in zip(step_sizes, bc2_sqrts, strict=True)]
    torch._foreach_addcdiv_(params, exp_avgs, denoms, scaled)


@dataclass(frozen=True)
class _Piece:
    """All of segment ``index``, or the flat slice ``span`` of it when the segment alone is too
    large for one chunk."""

    index: int
    segment: Segment
    nbytes: int
    span: slice | None = None

    def view(self, field: str) -> torch.Tensor:
        tensor = getattr(self.segment, field)
        return tensor if self.span is None else tensor.view(-1)[self.span]


@dataclass
class _ChunkGroup:
    """The chunks of one device and dtype, filled in order up to ``limit`` bytes each."""

    limit: int
    chunks: list[list[_Piece]]
    used: int = 0  # bytes in the last chunk

    def add(self, piece: _Piece) -> None:
        if self.chunks[-1] and self.used + piece.nbytes > self.limit:
            self.chunks.append([])
            self.used = 0
        self.chunks[-1].append(piece)
        self.used += piece.nbytes


def _chunks(segments: Sequence[Segment]) -> list[list[_Piece]]:
    """``segments`` in groups of one device and dtype (a multi-tensor op's lists must share
    both) whose temporary (one per pass, the size of the moments) fits in the device's
    `CHUNK_BYTES`. A contiguous segment too large for a chunk is cut into flat slices.

    Runs twice per step over every segment, so it does the least per segment it can.
    """
    # keyed by get_device(), an int (-1: CPU), cheaper than building a torch.device per segment
    # (an optimizer's segments live on one device type, so the index tells its devices apart)
    groups: dict[tuple[int, torch.dtype], _ChunkGroup] = {}
    for index, s in enumerate(segments):
        key = (s.param.get_device(), s.param.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _ChunkGroup(_chunk_bytes(s.param.device), [[]])
        for piece in _pieces(index, s, group.limit):
            group.add(piece)
    return [chunk for group in groups.values() for chunk in group.chunks if chunk]


def _chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)


def _pieces(index: int, s: Segment, chunk_bytes: int) -> list[_Piece]:
    size = s.exp_avg_sq.element_size()
    numel = s.exp_avg_sq.numel()
    if numel * size <= chunk_bytes or not all(
        t.is_contiguous() for t in (s.param, s.grad, s.exp_avg, s.exp_avg_sq)
    ):
        return [_Piece(index, s, numel * size)]
    per_chunk = max(1, chunk_bytes // size)
    return [
        _Piece(index, s, (min(a + per_chunk, numel) - a) * size, slice(a, a + per_chunk))
        for a in range(0, numel, per_chunk)
    ]


def _update_scalars(s: Segment, beta1: float, beta2: float) -> tuple[float, float, float]:
    """``(1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t))`` of one segment."""
    return (
        1.0 - s.lr * s.weight_decay,
        s.lr / (1.0 - beta1**s.step),
        math.sqrt(1.0 - beta2**s.step),
    )


def _segments(
    segments: Sequence[Segment], *, beta1: float, beta2: float, score: str
) -> Sequence[Segment]:
    """What the multi-tensor and reference passes take: the segments themselves."""
    return segments


def _winning(update: Callable[..., None]) -> Callable[..., None]:
    """``update`` (over a list of segments) applied to the chosen segments only."""

    def update_chosen(
        segments: Sequence[Segment], chosen: torch.Tensor, *, beta1: float, beta2: float, eps: float
    ) -> None:
        update(
            list(itertools.compress(segments, chosen.tolist())), beta1=beta1, beta2=beta2, eps=eps
        )

    return update_chosen


@dataclass(frozen=True)
class _Implementation:
    """One way to run the two passes: ``prepare`` reads the segments once (what both passes
    take), ``moments`` is pass 1, ``update`` is pass 2 over the chosen segments (a bool CPU
    tensor, one entry per segment)."""

    name: str
    prepare: Callable[..., object]
    moments: Callable[..., torch.Tensor]
    update: Callable[..., None]


_IMPLEMENTATIONS = {
    implementation.name: implementation
    for implementation in (
        _Implementation("fused", _kernel_batch, _kernel_moments, _kernel_update),
        _Implementation("foreach", _segments, _foreach_moments, _winning(_foreach_update)),
        _Implementation("reference", _segments, _reference_moments, _winning(_reference_update)),
    )
}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)
"""What `choose_implementation` can return."""

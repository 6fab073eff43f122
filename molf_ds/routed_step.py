"""The routed AdamW step, written once over *segments*.

A segment is a contiguous 1-D view of parameter, gradient and moment storage, tagged with the
``(module, expert)`` it belongs to; this module cannot tell which memory layout it came from
(docs/design.md, "Segments: one step for every memory layout"). It imports torch only; a
cross-rank reduction reaches it as ``reduce_scores``.

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

Each quantity has one function: `_segment_score_sum` (a segment's ``sum(...)``, written with
tensor ops; the other paths compute the same sum their own way), `_score_weight` (what multiplies
it: ``lr_e / N_e`` or ``1 / N_e``), `_expert_scores` (``S``: the weighted sums per expert, reduced
across ranks, PFN's root), `top_k_winners`, and `_update_scalars` (the update's
``1 - lr wd``, ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)``). `_route` runs the middle of the
step, from the segments' sums to whether each segment's expert won.

Three implementations of the whole step share one signature and are picked by a plain if/elif
in `routed_adamw`, as torch's ``adam()`` (which AdamW runs) picks ``_fused_adam``,
``_multi_tensor_adam`` or ``_single_tensor_adam`` (`choose_implementation` reads the ``fused`` /
``foreach`` flags the way torch does): `_fused_routed_adamw`, the CPU kernel (two SIMD +
OpenMP passes over host memory, `molf_ds.cpu_kernel`); `_multi_tensor_routed_adamw`,
``torch._foreach_*`` ops over lists of segments grouped by device and dtype, in chunks of bounded
size, so the number of ops a step dispatches does not grow with the number of segments (what
matters on an accelerator); and `_single_tensor_routed_adamw`, tensor ops per segment, the
readable reference the other two are tested against (docs/design.md, "Three implementations
behind one dispatcher").

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
from typing import Literal

import torch

from molf_ds import cpu_kernel

UNROUTED = -1
"""``Segment.module`` of parameters outside routed modules: plain AdamW, always updated."""

SCORES = ("epd", "pfn")

Implementation = Literal["fused", "foreach", "reference"]
"""Which path runs a step (`choose_implementation`)."""

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

ReduceScores = Callable[[torch.Tensor], None]
"""Sums the ``[modules, experts]`` float64 weighted score sums across ranks, in place."""


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
class RoutingRecord:
    """The routing decision of one step.

    ``scores`` (float64, ``-inf`` where an expert was not a candidate) and ``winners`` (bool)
    are ``[modules, experts]`` tensors on the parameters' device; ``winners[i, j]`` says whether
    expert ``expert_names[j]`` of ``module_names[i]`` was updated. `routed_adamw` leaves the
    names empty; `molf_ds.MoLFAdamW` fills them in from its plan. ``implementation`` says which
    path ran the step: ``"fused"`` (the CPU kernel), ``"foreach"`` (multi-tensor ops) or
    ``"reference"``. (The step's device-to-host reads are measured, not recorded:
    `molf_ds.testing.HostReadCounter`.)
    """

    scores: torch.Tensor
    winners: torch.Tensor
    implementation: Implementation
    module_names: tuple[str, ...] = ()
    expert_names: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        """Whether the fused CPU kernel ran."""
        return self.implementation == "fused"

    def fft_share(self) -> float:
        """Share of modules whose FFT expert won (reads the winners to the host)."""
        return float(self.winners[:, 0].float().mean())


def routed_adamw(
    segments: Sequence[Segment],
    table: RoutingTable,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    score: str,
    top_k: int,
    reduce_scores: ReduceScores | None = None,
    fused: bool | None = None,
    foreach: bool | None = None,
    grad_factor: float = 1.0,
) -> RoutingRecord:
    """One routed AdamW step over ``segments`` (see the module docstring for the math).

    Args:
        segments: every segment this process owns, routed and unrouted.
        table: ``N_e`` and candidate flags for each ``(module, expert)``.
        score: ``"epd"`` or ``"pfn"``.
        top_k: winners per module.
        reduce_scores: called once on the ``[modules, experts]`` float64 partial sums, in place
            (an all-reduce over the data-parallel group); ``None`` in a single process.
        fused, foreach: which implementation runs (`choose_implementation`).
        grad_factor: what every gradient is multiplied by before the step uses it (a ZeRO
            wrapper's unscale-and-clip factor, `molf_ds.ds_partitions`). The kernel applies it
            as pass 1 reads each gradient; the other paths multiply the gradients in place
            first, as the wrapper would have. Either way the product is the one torch's
            ``mul_`` stores, so the step is bitwise the same as after that separate pass.
    """
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    implementation = choose_implementation(segments, fused=fused, foreach=foreach)
    if implementation == "fused":
        func = _fused_routed_adamw
    elif implementation == "foreach":
        func = _multi_tensor_routed_adamw
    else:
        func = _single_tensor_routed_adamw
    scores, winners = func(
        segments,
        table,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        score=score,
        top_k=top_k,
        reduce_scores=reduce_scores,
        grad_factor=grad_factor,
    )
    return RoutingRecord(scores=scores, winners=winners, implementation=implementation)


def choose_implementation(
    segments: Sequence[Segment], *, fused: bool | None, foreach: bool | None
) -> Implementation:
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


def _use_cpu_kernel(segments: Sequence[Segment], fused: bool | None) -> bool:
    suitable = all(
        cpu_kernel.kernel_can_read(t)
        for s in segments
        for t in (s.param, s.grad, s.exp_avg, s.exp_avg_sq)
    )
    if fused is None:
        return suitable and cpu_kernel.available()
    if not suitable:
        raise ValueError(
            "`fused=True` needs plain (not DTensor or other subclass), contiguous float32 CPU "
            "tensors; use fused=None to fall back"
        )
    cpu_kernel.load()  # raises KernelUnavailable with the compiler's message
    return True


# ---------------------------------------------------------------------------------------------
# The quantities of the algorithm, each written once


def _segment_score_sum(s: Segment, eps: float, score: str) -> torch.Tensor:
    """A routed segment's sum of score terms, as a float64 scalar on its device: with
    ``d = sqrt(v) + eps``, EPD sums ``m^2 / d`` and PFN ``(m / d)^2``."""
    # One temporary the size of the segment: d becomes the score term in place.
    term = s.exp_avg_sq.sqrt().add_(eps)
    torch.div(s.exp_avg, term, out=term)
    if score == "epd":
        term.mul_(s.exp_avg)
    else:
        term.square_()
    return term.sum().double()


def _score_weight(lr: float, expert_numel: int, score: str) -> float:
    """What multiplies a segment's score sum in its expert's score: EPD's ``lr_e / N_e``, PFN's
    ``1 / N_e`` (under the root). Linear, so applied to each segment before the cross-rank sum:
    a rank that holds nothing of an expert need not know its learning rate."""
    return (lr if score == "epd" else 1.0) / expert_numel


def _expert_scores(
    sums: torch.Tensor,
    cells: torch.Tensor,
    weights: torch.Tensor,
    shape: tuple[int, int],
    score: str,
    reduce_scores: ReduceScores | None,
) -> torch.Tensor:
    """``S``, ``[modules, experts]`` float64: each expert's weighted sum of its segments' score
    sums (segment ``i`` adds ``weights[i] * sums[i]`` into cell ``cells[i]`` of the flattened
    table, unrouted segments into one spare cell past its end), summed across ranks by
    ``reduce_scores``; PFN's square root is taken after that sum."""
    flat = torch.zeros(shape[0] * shape[1] + 1, dtype=torch.float64, device=weights.device)
    flat.index_add_(0, cells, sums * weights)
    scores = flat[:-1].view(shape)
    if reduce_scores is not None:
        reduce_scores(scores)
    return scores.sqrt() if score == "pfn" else scores


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


def _update_scalars(s: Segment, beta1: float, beta2: float) -> tuple[float, float, float]:
    """``(1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t))`` of one segment: the update is
    ``p <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
    return (
        1.0 - s.lr * s.weight_decay,
        s.lr / (1.0 - beta1**s.step),
        math.sqrt(1.0 - beta2**s.step),
    )


@dataclass(frozen=True)
class _Cells:
    """Where each segment's score sum goes in the flattened ``[modules, experts]`` table, and
    its `_score_weight`, as tensors on the segments' device (unrouted: a spare cell, weight 0)."""

    index: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def of(cls, segments: Sequence[Segment], table: RoutingTable, score: str) -> _Cells:
        num_modules, num_experts = table.shape
        expert_numel, spare = table.expert_numel, num_modules * num_experts
        rows = [
            (spare, 0.0)
            if s.module == UNROUTED
            else (
                s.module * num_experts + s.expert,
                _score_weight(s.lr, expert_numel[s.module][s.expert], score),
            )
            for s in segments
        ]
        index, weight = cpu_kernel.columns(rows, 2)
        device = segments[0].param.device if segments else torch.device("cpu")
        return cls(_on(device, "q", index), _on(device, "d", weight))


def _route(
    sums: torch.Tensor,
    cells: _Cells,
    table: RoutingTable,
    *,
    score: str,
    top_k: int,
    reduce_scores: ReduceScores | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each segment's score sum to ``(scores, winners, chosen)``: `_expert_scores` (``-inf``
    where an expert is no candidate), `top_k_winners`, and ``chosen``, whether each segment's
    expert won, as a bool CPU tensor: the step's one device-to-host read."""
    scores = _expert_scores(sums, cells.index, cells.weight, table.shape, score, reduce_scores)
    candidates = torch.tensor(table.candidates, dtype=torch.bool).to(
        scores.device, non_blocking=True
    )
    scores = scores.masked_fill(~candidates, -math.inf)
    winners = top_k_winners(scores, candidates, top_k)
    # unrouted segments point at the spare cell, which never wins
    chosen = torch.cat([winners.view(-1), winners.new_zeros(1)])[cells.index].cpu()
    return scores, winners, chosen


def _on(device: torch.device, typecode: str, values: Sequence) -> torch.Tensor:
    """``values`` as a tensor on ``device``, through `array` (faster than torch.tensor of a
    list of a few hundred numbers, which this step would pay every time)."""
    dtype = _TYPECODES[typecode]
    if not values:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.frombuffer(array.array(typecode, values), dtype=dtype).to(device)


_TYPECODES = {"q": torch.int64, "d": torch.float64}


# ---------------------------------------------------------------------------------------------
# The three implementations. Each reads what it needs of every segment in sweeps before pass 1
# (`_Cells.of`, the kernel's batch): afterwards the passes and the routing touch only a few
# small tensors, not hundreds of Python objects the pass has pushed out of the caches.


def _fused_routed_adamw(
    segments: Sequence[Segment],
    table: RoutingTable,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    score: str,
    top_k: int,
    reduce_scores: ReduceScores | None,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel: pass 1 and pass 2 each one call over all segments; the winner flags
    reach it in host memory, so Python reads no tensor value."""
    cells = _Cells.of(segments, table, score)
    kind = SCORES.index(score)
    rows = [
        (-1 if s.module == UNROUTED else kind, *_update_scalars(s, beta1, beta2)) for s in segments
    ]
    batch = cpu_kernel.Batch(segments, *cpu_kernel.columns(rows, 4))
    sums = batch.moments_and_partials(beta1=beta1, beta2=beta2, eps=eps, grad_factor=grad_factor)
    scores, winners, chosen = _route(
        sums, cells, table, score=score, top_k=top_k, reduce_scores=reduce_scores
    )
    batch.apply_update(chosen, eps=eps)
    return scores, winners


def _single_tensor_routed_adamw(
    segments: Sequence[Segment],
    table: RoutingTable,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    score: str,
    top_k: int,
    reduce_scores: ReduceScores | None,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor ops per segment: the readable reference the other two are tested against."""
    _multiply_gradients(segments, grad_factor)
    cells = _Cells.of(segments, table, score)
    sums = [_single_tensor_moments(s, beta1, beta2, eps, score) for s in segments]
    # rebound: the list of scalars is freed before pass 2 allocates its temporaries
    sums = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)
    scores, winners, chosen = _route(
        sums, cells, table, score=score, top_k=top_k, reduce_scores=reduce_scores
    )
    for s in itertools.compress(segments, chosen.tolist()):
        _single_tensor_update(s, beta1, beta2, eps)
    return scores, winners


def _multiply_gradients(segments: Sequence[Segment], grad_factor: float) -> None:
    """The gradients times ``grad_factor``, in place (the pass a ZeRO wrapper would have made;
    the kernel applies the factor as it reads them instead)."""
    if grad_factor != 1.0 and segments:
        torch._foreach_mul_([s.grad for s in segments], grad_factor)


def _single_tensor_moments(
    s: Segment, beta1: float, beta2: float, eps: float, score: str
) -> torch.Tensor:
    """Pass 1 of one segment: its moments, then its `_segment_score_sum`, or (unrouted, 0) its
    update."""
    s.exp_avg.mul_(beta1).add_(s.grad, alpha=1 - beta1)
    s.exp_avg_sq.mul_(beta2).addcmul_(s.grad, s.grad, value=1 - beta2)
    if s.module != UNROUTED:
        return _segment_score_sum(s, eps, score)
    _single_tensor_update(s, beta1, beta2, eps)
    return torch.zeros((), dtype=torch.float64, device=s.param.device)


def _single_tensor_update(s: Segment, beta1: float, beta2: float, eps: float) -> None:
    decay, step_size, bc2_sqrt = _update_scalars(s, beta1, beta2)
    s.param.mul_(decay)
    denom = s.exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps)
    s.param.addcdiv_(s.exp_avg, denom, value=-step_size)


def _multi_tensor_routed_adamw(
    segments: Sequence[Segment],
    table: RoutingTable,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    score: str,
    top_k: int,
    reduce_scores: ReduceScores | None,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch._foreach_*`` ops over chunks of segments: the reference's arithmetic, one op
    per list, a bounded number of ops per step."""
    _multiply_gradients(segments, grad_factor)
    cells = _Cells.of(segments, table, score)
    sums = _foreach_moments(segments, beta1=beta1, beta2=beta2, eps=eps, score=score)
    scores, winners, chosen = _route(
        sums, cells, table, score=score, top_k=top_k, reduce_scores=reduce_scores
    )
    for chunk in _chunks(list(itertools.compress(segments, chosen.tolist()))):
        _foreach_update(chunk, beta1, beta2, eps)
    return scores, winners


def _foreach_moments(
    segments: Sequence[Segment], *, beta1: float, beta2: float, eps: float, score: str
) -> torch.Tensor:
    """Pass 1 as multi-tensor ops: the moments, the unrouted pieces' update, and each
    segment's `_segment_score_sum` (0 if unrouted), float64.

    Written for the bytes each op streams (what bounds a step on any device): ``m`` moves by one
    lerp (as in torch's AdamW), and each score sum is a squared 2-norm, so one temporary and one
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
            _foreach_update(
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
    sums = torch.zeros(len(segments), dtype=torch.float64, device=device)
    for values, owners in norms.values():
        squares = torch.stack(values).double().square()
        # a split segment's pieces add up
        sums.index_add_(0, torch.tensor(owners, device=device), squares)
    return sums


def _foreach_update(chunk: list[_Piece], beta1: float, beta2: float, eps: float) -> None:
    """Pass 2 over one chunk as multi-tensor ops: `_single_tensor_update`'s update with the bias
    correction moved out of the denominator, ``m / (sqrt(v)/c + eps) = c m / (sqrt(v) + c eps)``
    with ``c = sqrt(1 - b2^t)``, which saves one pass over the temporary (equal up to fp32
    rounding)."""
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

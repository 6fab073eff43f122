"""Build and load the fused CPU kernel (``kernels/routed_adamw_cpu.cpp``) with ctypes.

The kernel is plain C++ with OpenMP and no torch headers, so it builds in about a second with the
system's ``g++`` the first time it is needed. The shared library is cached under
``$MOLF_DS_CACHE`` (default ``$TORCH_EXTENSIONS_DIR/molf_ds``, else ``~/.cache/molf_ds``), keyed
by the source, the flags and this CPU's feature flags (it is built with ``-march=native``, so a
cache shared between different machines must not hand one machine another's binary).
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

_SOURCE = Path(__file__).with_name("kernels") / "routed_adamw_cpu.cpp"
_FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fno-math-errno",  # lets sqrt vectorise; results are unchanged for finite inputs
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
)
_PTR = ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """The CPU kernel could not be built (no C++ compiler, or the build failed)."""


def _cache_dir() -> Path:
    if "MOLF_DS_CACHE" in os.environ:
        return Path(os.environ["MOLF_DS_CACHE"])
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "molf_ds"
    return Path.home() / ".cache" / "molf_ds"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join((compiler, *_FLAGS, _cpu_flags())).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"routed_adamw_cpu-{platform.machine()}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: ranks that build at the same time never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_out = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp_out)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise KernelUnavailable(f"building the CPU kernel failed:\n{result.stderr[-2000:]}")
        os.replace(tmp_out, target)
    return target


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The loaded kernel library (built on first use). Raises `KernelUnavailable`."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler found (set CXX or install g++)")
    if array.array("i").itemsize != 4:  # the score kinds travel as C int, read as int32_t
        raise KernelUnavailable("this platform's C int is not 32 bits")
    lib = ctypes.CDLL(str(_build(compiler)))
    lib.molf_moments_and_partials.argtypes = [
        ctypes.c_int64,
        *[_PTR] * 9,
        *[ctypes.c_float] * 6,
        _PTR,
        ctypes.c_int32,
    ]
    lib.molf_moments_and_partials.restype = None
    lib.molf_apply_update.argtypes = [ctypes.c_int64, *[_PTR] * 8, ctypes.c_float, ctypes.c_int32]
    lib.molf_apply_update.restype = None
    lib.molf_copy_spans.argtypes = [*[_PTR] * 4, ctypes.c_int64, ctypes.c_int32]
    lib.molf_copy_spans.restype = None
    return lib


def available() -> bool:
    try:
        load()
    except (KernelUnavailable, OSError):
        return False
    return True


class SegmentTensors(Protocol):
    """What the kernel reads of a segment: four contiguous float32 CPU tensors of one shape."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class Batch:
    """One step's segments as the kernel's argument arrays, built once for both passes.

    The arrays are built with the standard `array` module, in one sweep over the segments: for
    a few hundred segments that is about 4x faster than torch.tensor of lists, and a step pays
    it every time (after pass 1 has streamed the whole model through the caches, every Python
    object a sweep touches is a cache miss, so pass 2 reuses these arrays instead of sweeping
    again).

    Args:
        segments: contiguous float32 CPU tensors (the caller checks).
        score_kinds: per segment, -1 (unrouted: pass 1 also applies its update), 0 (EPD) or
            1 (PFN).
        decays, step_sizes, bias_correction2_sqrts: per segment, ``1 - lr wd``,
            ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)``.
    """

    def __init__(
        self,
        segments: Sequence[SegmentTensors],
        score_kinds: Sequence[int],
        decays: Sequence[float],
        step_sizes: Sequence[float],
        bias_correction2_sqrts: Sequence[float],
    ) -> None:
        self.size = len(segments)
        rows = [
            (
                s.param.data_ptr(),
                s.grad.data_ptr(),
                s.exp_avg.data_ptr(),
                s.exp_avg_sq.data_ptr(),
                s.param.numel(),
            )
            for s in segments
        ]
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.numels = (
            array.array("q", column) for column in columns(rows, 5)
        )
        self.score_kinds = array.array("i", score_kinds)
        self.scalars = [
            array.array("f", values) for values in (decays, step_sizes, bias_correction2_sqrts)
        ]
        if any(len(values) != self.size for values in (self.score_kinds, *self.scalars)):
            raise ValueError(f"every per-segment list must have {self.size} entries")
        # The arrays hold raw addresses: keep the tensors (some are copies, e.g. a gradient
        # made contiguous, owned by nothing else) alive as long as the addresses.
        self._segments = segments

    def moments_and_partials(
        self, *, beta1: float, beta2: float, eps: float, grad_factor: float = 1.0
    ) -> torch.Tensor:
        """Pass 1, each gradient read multiplied by ``grad_factor`` (rounded to float32, as
        torch's ``mul_`` of a float32 tensor rounds it); returns the float64 partial score sum
        of each segment (0 if unrouted)."""
        partials = torch.empty(self.size, dtype=torch.float64)
        load().molf_moments_and_partials(
            self.size,
            *map(_address, (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs)),
            _address(self.numels),
            _address(self.score_kinds),
            *map(_address, self.scalars),
            beta1,
            beta2,
            1.0 - beta1,  # in double: see moments_chunk
            1.0 - beta2,
            eps,
            grad_factor,
            partials.data_ptr(),
            torch.get_num_threads(),
        )
        return partials

    def apply_update(self, selected: torch.Tensor, *, eps: float) -> None:
        """Pass 2: the decoupled AdamW update of the segments where ``selected`` (a bool CPU
        tensor, one entry per segment) is true, in place."""
        if selected.dtype != torch.bool or not selected.is_cpu or selected.numel() != self.size:
            raise ValueError(f"`selected` must be {self.size} bools on the CPU, got {selected!r}")
        selected = selected.contiguous()
        load().molf_apply_update(
            self.size,
            *map(_address, (self.params, self.exp_avgs, self.exp_avg_sqs, self.numels)),
            selected.data_ptr(),  # a bool is one byte, 0 or 1
            *map(_address, self.scalars),
            eps,
            torch.get_num_threads(),
        )


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def kernel_can_read(tensor: torch.Tensor) -> bool:
    """Whether the CPU kernel may read ``tensor`` as raw memory: a plain, dense, contiguous
    float32 CPU tensor.

    Every tensor of a step is checked, because a wrong read is silent: a float64 moment or a CUDA
    gradient must mean another path. A tensor subclass (FSDP2's DTensor, a fake tensor) is
    refused whatever its device says, since its data pointer need not be its values (a DTensor
    reports the device and dtype of its shard but has no storage of its own); so are meta and
    sparse tensors. (`is_cpu` builds no torch.device, as this runs per tensor every step.)
    """
    return (
        type(tensor) in _PLAIN_TENSOR_TYPES
        and tensor.is_cpu
        and tensor.layout == torch.strided
        and tensor.dtype == torch.float32
        and tensor.is_contiguous()
    )


def can_copy_spans(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether `copy_spans` may read ``src`` and write ``dst`` as raw memory: two tensors
    `kernel_can_read`, of one size."""
    return dst.numel() == src.numel() and kernel_can_read(dst) and kernel_can_read(src)


def copy_spans(dst: torch.Tensor, src: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
    """``dst[start:start + numel] = src[start:start + numel]`` for each ``(start, numel)`` of
    ``spans``, in one call: both plain contiguous float32 CPU tensors of one size (checked, as
    the kernel reads raw memory)."""
    if not can_copy_spans(dst, src):
        raise ValueError("copy_spans needs two contiguous float32 CPU tensors of one size")
    if any(start < 0 or numel < 0 or start + numel > dst.numel() for start, numel in spans):
        raise ValueError(f"a span lies outside the {dst.numel()} elements")
    starts, numels = (array.array("q", column) for column in columns(spans, 2))
    load().molf_copy_spans(
        dst.data_ptr(),
        src.data_ptr(),
        _address(starts),
        _address(numels),
        len(spans),
        torch.get_num_threads(),
    )


def columns(rows: Sequence[tuple], width: int) -> list[tuple]:
    """``rows`` of ``width`` values as ``width`` columns (empty ones when there are no rows)."""
    return list(zip(*rows, strict=True)) if rows else [()] * width


def _address(values: array.array) -> int:
    """The address of ``values``' buffer (its owner keeps it alive until the kernel returns)."""
    return values.buffer_info()[0]

"""Build and load the fused CPU kernel (``kernels/routed_adamw_cpu.cpp``) with ctypes.

The kernel is plain C++ with OpenMP and no torch headers, so it builds in about a second with the
system's ``g++`` the first time it is needed. The shared library is cached under
``$MOLF_DS_CACHE`` (default ``$TORCH_EXTENSIONS_DIR/molf_ds``, else ``~/.cache/molf_ds``), keyed
by the source, the flags and this CPU's feature flags (it is built with ``-march=native``, so a
cache shared between different machines must not hand one machine another's binary).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

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
    lib = ctypes.CDLL(str(_build(compiler)))
    lib.molf_moments_and_partials.argtypes = [
        ctypes.c_int64,
        *[_PTR] * 9,
        *[ctypes.c_float] * 5,
        _PTR,
        ctypes.c_int32,
    ]
    lib.molf_moments_and_partials.restype = None
    lib.molf_apply_update.argtypes = [ctypes.c_int64, *[_PTR] * 7, ctypes.c_float, ctypes.c_int32]
    lib.molf_apply_update.restype = None
    return lib


def available() -> bool:
    try:
        load()
    except (KernelUnavailable, OSError):
        return False
    return True


def _pointers(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _update_scalars(*per_segment: list[float]) -> list[torch.Tensor]:
    """The per-segment update scalars (decays, step sizes, sqrt(1 - b2^t)) as float32 arrays."""
    return [torch.tensor(values, dtype=torch.float32) for values in per_segment]


def moments_and_partials(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    score_kinds: list[int],
    decays: list[float],
    step_sizes: list[float],
    bias_correction2_sqrts: list[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Pass 1 over contiguous fp32 CPU segments; returns the float64 partial sum of each.

    Segments of score kind -1 (unrouted) also take their update, with their entries of
    ``decays``, ``step_sizes`` and ``bias_correction2_sqrts`` (ignored for the others)."""
    n = len(grads)
    partials = torch.empty(n, dtype=torch.float64)
    keep = [_pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs)]
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    kinds = torch.tensor(score_kinds, dtype=torch.int32)
    scalars = _update_scalars(decays, step_sizes, bias_correction2_sqrts)
    load().molf_moments_and_partials(
        n,
        *(t.data_ptr() for t in keep),
        numels.data_ptr(),
        kinds.data_ptr(),
        *(t.data_ptr() for t in scalars),
        beta1,
        beta2,
        1.0 - beta1,  # in double: see moments_chunk
        1.0 - beta2,
        eps,
        partials.data_ptr(),
        torch.get_num_threads(),
    )
    return partials


def apply_update(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    decays: list[float],
    step_sizes: list[float],
    bias_correction2_sqrts: list[float],
    *,
    eps: float,
) -> None:
    """Pass 2: the decoupled AdamW update of each segment, in place."""
    if not params:
        return
    keep = [_pointers(params), _pointers(exp_avgs), _pointers(exp_avg_sqs)]
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    scalars = _update_scalars(decays, step_sizes, bias_correction2_sqrts)
    load().molf_apply_update(
        len(params),
        *(t.data_ptr() for t in keep),
        numels.data_ptr(),
        *(t.data_ptr() for t in scalars),
        eps,
        torch.get_num_threads(),
    )

"""`HostReadCounter`: count the points where Python waits for tensor values -- without a GPU.

On an accelerator every such point is a device-to-host synchronisation: the host stops until the
device has computed the value and copied it back. The routed step is designed to make exactly one
(which segments' experts won); this counter measures it, on any device, so a CPU-only test can
check what a GPU run would synchronise on::

    with HostReadCounter() as reads:
        optimizer.step()
    print(reads.count, reads.reads)  # e.g. 1 ['Tensor.tolist']

What counts as one read:

* a Python value read of a tensor -- ``.item()``, ``.tolist()``, ``.numpy()``,
  ``numpy.asarray(t)``, ``bool(t)`` (``if t:``), ``int(t)``, ``float(t)``, ``complex(t)``,
  indexing a list with a tensor, formatting or printing a tensor -- seen through a
  `torch.overrides.TorchFunctionMode`;
* a copy from a non-CPU device into CPU memory (``.cpu()``, ``.to("cpu")``, ``cpu_t.copy_(t)``),
  seen by a `TorchDispatchMode` as ``aten._to_copy`` / ``aten.copy_``; a value read of such a
  host copy afterwards is the same synchronisation and is not counted again. On a CPU tensor
  ``.cpu()`` moves nothing, so there the read is counted where the values reach Python: both
  ``gpu_t.cpu().tolist()`` and ``cpu_t.cpu().tolist()`` count one;
* an op whose result needs tensor values on the host: ``aten._local_scalar_dense`` (what
  ``.item()`` runs, also when another op's Python-visible decomposition calls it),
  ``aten.equal``, ``aten.allclose``, ``aten.is_nonzero``, and the ops whose output size depends
  on the data: ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without
  ``output_size``, and indexing or index assignment with a boolean mask (``t[mask]``,
  ``t[mask] = v``).

Nested reads count once (``bool(t)`` is one read, not ``__bool__`` plus its
``_local_scalar_dense``). Not seen: synchronisations inside other ops' C++ code, explicit
``torch.cuda.synchronize`` or stream/event waits, and code that reads memory through
``data_ptr()`` (as the fused CPU kernel does, which runs on host memory).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Tensor methods that hand tensor values to Python.
_VALUE_READS = frozenset(
    getattr(torch.Tensor, name)
    for name in (
        "item",
        "tolist",
        "numpy",
        "__array__",
        "__bool__",
        "__int__",
        "__float__",
        "__complex__",
        "__index__",
        "__format__",
        "__repr__",
    )
)
# aten ops (overload packets) whose result needs tensor values on the host.
_SCALAR_OPS = frozenset(
    {
        "_local_scalar_dense",
        "equal",
        "allclose",
        "is_nonzero",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)
_COPY_OPS = frozenset({"_to_copy", "copy_"})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


class HostReadCounter:
    """Context manager counting host reads (see the module docstring for what counts).

    Attributes:
        reads: one entry per read, in order: ``"Tensor.<method>"`` for a value read from Python,
            ``"aten.<op>"`` for an op (a device-to-host copy is ``"aten._to_copy"`` or
            ``"aten.copy_"``).
    """

    def __init__(self) -> None:
        self.reads: list[str] = []
        self._depth = 0  # > 0 while a counted value read runs: its inner ops are the same read
        self._host_copies: set[int] = set()  # ids of CPU tensors made by a counted copy
        self._function_mode = _FunctionReads(self)
        self._dispatch_mode = _DispatchReads(self)

    @property
    def count(self) -> int:
        """Host reads seen so far."""
        return len(self.reads)

    def __enter__(self) -> HostReadCounter:
        self._dispatch_mode.__enter__()
        try:
            self._function_mode.__enter__()
        except BaseException:
            self._dispatch_mode.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._function_mode.__exit__(*exc)
        finally:
            self._dispatch_mode.__exit__(*exc)

    def _mark_host_copy(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key not in self._host_copies:
            self._host_copies.add(key)
            weakref.finalize(tensor, self._host_copies.discard, key)


class _FunctionReads(TorchFunctionMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if func not in _VALUE_READS or counter._depth:
            return func(*args, **kwargs)
        tensor = args[0] if args else None
        if not (isinstance(tensor, torch.Tensor) and id(tensor) in counter._host_copies):
            counter.reads.append(f"Tensor.{func.__name__}")
        counter._depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            counter._depth -= 1


class _DispatchReads(TorchDispatchMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self.counter
        name = func.overloadpacket.__name__
        if counter._depth:
            return out
        if name in _SCALAR_OPS or _data_dependent_size(name, args, kwargs):
            counter.reads.append(f"aten.{name}")
        elif name in _COPY_OPS:
            dest = args[0] if name == "copy_" else out
            sources = args[1:2] if name == "copy_" else args[:1]
            if _device_to_host(sources, dest):
                counter.reads.append(f"aten.{name}")
                counter._mark_host_copy(dest)
        return out


def _data_dependent_size(name: str, args: Any, kwargs: dict) -> bool:
    """Whether an op must read a tensor's values to know its output size."""
    if name == "repeat_interleave":
        repeats = args[0] if len(args) == 1 else args[1] if len(args) > 1 else None
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in _INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
    return False


def _device_to_host(sources: Any, dest: Any) -> bool:
    if not isinstance(dest, torch.Tensor) or dest.device.type != "cpu":
        return False
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(sources))

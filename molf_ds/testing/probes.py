"""What one call costs beyond its time, measured on any device, the CPU included: the tensor
storage it allocates for a while (`TransientMemory`), the ops it dispatches (`DispatchedOps`)
and the bytes it copies into given tensors (`CopiedBytes`).

Both are torch dispatch modes: they see every aten op (a ``torch._foreach_*`` call is one op),
so the memory and the launch count a step would have on an accelerator can be checked by tests
on a machine without one. `molf_ds.testing.HostReadCounter` is their sibling for
device-to-host reads.

    with TransientMemory() as memory, DispatchedOps() as ops:
        optimizer.step()
    print(memory.peak, ops.count)
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TransientMemory(TorchDispatchMode):
    """Peak bytes of new tensor storage that ops allocate while the mode is active.

    The CPU has no allocator statistics, so every op's outputs are checked: storage that is
    not one of the op's inputs is new, counted until the tensor is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t, t.untyped_storage().nbytes())
        return out

    def _track(self, tensor: torch.Tensor, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


class DispatchedOps(TorchDispatchMode):
    """Counts the aten ops dispatched while the mode is active (``by_name``: per op)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_name.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class CopiedBytes(TorchDispatchMode):
    """Bytes that ``copy_`` writes, while the mode is active, into the storage of any of
    ``targets`` (e.g. the model's parameter partitions a ZeRO step copies its result into),
    and those the CPU kernel's span copy (`molf_ds.cpu_kernel.copy_spans`, which copies outside
    torch) is called to write there.

    A copy of a tensor onto the very same data (storage, offset, shape, strides, dtype) is not
    counted: torch's ``copy_`` returns from it without touching memory. ``copies`` counts the
    copies that did write (a span copy: one per span).
    """

    def __init__(self, targets: list[torch.Tensor]) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in targets}
        self.bytes = self.copies = 0
        self._copy_spans = None

    def __enter__(self):
        from molf_ds import cpu_kernel

        self._copy_spans = original = cpu_kernel.copy_spans

        def counted(dst: torch.Tensor, src: torch.Tensor, spans) -> None:
            original(dst, src, spans)
            if dst.untyped_storage().data_ptr() in self.storages:
                self.bytes += sum(numel for _, numel in spans) * dst.element_size()
                self.copies += len(spans)

        cpu_kernel.copy_spans = counted
        return super().__enter__()

    def __exit__(self, *exc):
        from molf_ds import cpu_kernel

        cpu_kernel.copy_spans = self._copy_spans
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.untyped_storage().data_ptr() in self.storages and not _same_data(dst, src):
                self.bytes += dst.numel() * dst.element_size()
                self.copies += 1
        return func(*args, **(kwargs or {}))


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )

"""`CollectiveCounter`: count the collectives a block of code starts, and its all-reduce sizes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from molf_ds import ds_partitions

COLLECTIVES = (
    "all_reduce",
    "inference_all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_base",
    "all_gather_coalesced",
    "all_to_all_single",
)
_ABSENT = object()


class CollectiveCounter:
    """Counts the collectives (and all-reduce sizes) started inside ``with counter:`` blocks.

    Two doors are watched: DeepSpeed's communication backend (`ds_partitions.comm_backend`,
    which may bypass torch.distributed, e.g. its shared-memory all-reduce on CPU) and
    torch.distributed itself (which molf_ds's routing all-reduce uses). A call that enters
    through DeepSpeed's door is counted once, there. The counts add up over blocks; nothing is
    patched outside them.

        counter = CollectiveCounter()
        with counter:
            train_one_step()
        counter.calls  # Counter({"all_reduce": 3, ...})
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.all_reduce_numels: list[int] = []
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> CollectiveCounter:
        for owner in (ds_partitions.comm_backend(), torch.distributed):
            if owner is None:
                continue
            for name in COLLECTIVES:
                if hasattr(owner, name):
                    self._saved.append((owner, name, vars(owner).get(name, _ABSENT)))
                    setattr(owner, name, self._wrap(name, getattr(owner, name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for owner, name, original in reversed(self._saved):
            if original is _ABSENT:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.calls[name] += 1
                tensor = args[0] if args else kwargs.get("tensor")
                if "all_reduce" in name and isinstance(tensor, torch.Tensor):
                    self.all_reduce_numels.append(tensor.numel())
            self._depth += 1  # a collective built on another is one call
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

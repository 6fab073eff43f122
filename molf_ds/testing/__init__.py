"""Probes for tests and benchmarks, kept out of the library as torch keeps its own under
``torch.testing``: what a call costs beyond its time, measured on any device, the CPU included.

* `HostReadCounter`: the points where Python waits for tensor values (device-to-host reads).
* `TransientMemory`, `DispatchedOps`: the tensor storage a call allocates for a while, and the
  aten ops it dispatches (what an accelerator would launch).
* `CopiedBytes`: the bytes a call copies into given tensors (a ZeRO step into the model's
  parameter partitions).
* `CollectiveCounter`: the collectives a block starts (DeepSpeed's and torch.distributed's).
"""

from molf_ds.testing.collectives import CollectiveCounter
from molf_ds.testing.host_reads import HostReadCounter
from molf_ds.testing.probes import CopiedBytes, DispatchedOps, TransientMemory

__all__ = [
    "CollectiveCounter",
    "CopiedBytes",
    "DispatchedOps",
    "HostReadCounter",
    "TransientMemory",
]

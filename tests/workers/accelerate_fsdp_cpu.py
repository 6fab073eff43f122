"""accelerate's FSDP2 path on CPU ranks (gloo), for the tests and the GPU check's dry run.

accelerate 1.15 turns its FSDP plugin on only for accelerator ranks: `AcceleratorState` sets
``distributed_type = FSDP`` inside its MULTI_GPU/MULTI_XPU/... branch, and on CPU ranks
(MULTI_CPU) it keeps DDP and drops the plugin without a word (without ``cpu=True`` each rank even
trains alone). FSDP2 itself runs on CPU ranks over gloo, so the tests set the two state fields
accelerate's ``prepare`` reads (and the plugin's mixed precision, as accelerate would) -- nothing
else -- and the real ``_prepare_fsdp2`` runs: the
optimizer's parameters swapped for placeholders, ``fully_shard`` by the plugin's wrap policy,
the DTensors mapped back into the optimizer's group. The GPU check runs it unforced.

Launched in place of examples/accelerate_molf.py (same arguments), by ``accelerate launch`` with
examples/accelerate_fsdp2.yaml:
    accelerate launch --config_file examples/accelerate_fsdp2.yaml \
        tests/workers/accelerate_fsdp_cpu.py --model M --data D.jsonl --out OUT --cpu
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def fsdp_on_cpu_ranks(accelerator: Any, plugin: Any) -> None:
    """Make ``accelerator`` (on CPU ranks) prepare models with FSDP ``plugin``."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        raise RuntimeError(f"expected CPU ranks (MULTI_CPU), got {state.distributed_type}")
    if state.mixed_precision != "no":  # as AcceleratorState's FSDP branch does
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # Both shared states: a later `Accelerator()` copies PartialState's over AcceleratorState's.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def main() -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    import molf_ds

    molf_ds.init_distributed()
    PartialState(cpu=True)
    # The plugin accelerate launch describes in the environment (FSDP_VERSION=2, the wrap
    # policy, ...); the example's own `Accelerator()` then finds this shared state set up.
    fsdp_on_cpu_ranks(Accelerator(), FullyShardedDataParallelPlugin())
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import accelerate_molf

    model = accelerate_molf.main()
    from torch.distributed.tensor import DTensor

    # What the test reads to know FSDP2 trained, not DDP (whose results would be the same).
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    print(f"DTensor parameters: {sharded} of {len(list(model.parameters()))}", flush=True)


if __name__ == "__main__":
    from molf_ds.runtime import run_then_exit

    run_then_exit(main)

"""molf_ds: MoLF -- a Mixture of LoRA and Full fine-tuning, routed at the optimizer -- for
DeepSpeed ZeRO.

Public API::

    model = molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(64,)))
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-5, lora_lr=1e-4, top_k=1)
    ...
    molf_ds.merge(model).save_pretrained("out/merged")
"""

from molf_ds.config import MoLFConfig
from molf_ds.errors import MoLFConfigError, MoLFError, NoMatchingModulesError
from molf_ds.layer import MoLFLinear
from molf_ds.memory import estimate_memory
from molf_ds.model import merge, wrap
from molf_ds.optimizer import MoLFAdamW
from molf_ds.routed_step import RoutingRecord
from molf_ds.zero import init_distributed, initialize

__all__ = [
    "MoLFAdamW",
    "MoLFConfig",
    "MoLFConfigError",
    "MoLFError",
    "MoLFLinear",
    "NoMatchingModulesError",
    "RoutingRecord",
    "estimate_memory",
    "init_distributed",
    "initialize",
    "merge",
    "wrap",
]
__version__ = "0.1.0"

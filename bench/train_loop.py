"""Tokens/s of molf-train's own training loop for one mode, in this process; prints one JSON line.

    python3 -m bench.train_loop mode=fft model=tiny-qwen2 max_steps=30   # any molf-train options

molf-train's `Recipe` runs its set-up and its loop (the same code as ``molf-train``), but not its
end: no final checkpoint, export or evaluation, which for a large model would write tens of GB and
take longer than the steps. Metrics are logged twice (``log_every`` = half of ``max_steps``), and
the tokens/s reported is the second record's: the second half of the steps, after the first
steps' warm-up. One process: rank 0 of 1 (bf16 on a GPU unless ``bf16=false``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from molf_ds.runtime import run_then_exit
from molf_ds.train.config import load_config
from molf_ds.train.recipe import Recipe


def measure(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        given = load_config(None, overrides)
        half = max(1, given.max_steps // 2)
        defaults = [f"output_dir={tmp}/run", "eval_examples=1", f"log_every={half}"]
        config = load_config(None, defaults + overrides)
        recipe = Recipe(config)
        started = time.perf_counter()
        recipe.setup()
        setup_s = time.perf_counter() - started
        recipe.train()
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
        result = {
            "model": config.model,
            "mode": config.mode,
            "ds_config": config.ds_config,
            "bf16": recipe.derived.bf16,
            "optimizer": type(recipe.optimizer).__name__,
            "trainable_params": sum(
                getattr(p, "ds_numel", p.numel())
                for p in recipe.model.parameters()
                if p.requires_grad
            ),
            "steps": config.max_steps,
            "micro_batch_size": config.micro_batch_size,
            "tokens_per_s": records[-1]["tokens_per_s"],
            "final_loss": records[-1].get("loss"),
            "setup_s": round(setup_s, 1),
            "train_s": round(time.perf_counter() - started - setup_s, 1),
            "peak_gpu_bytes": _peak_gpu_bytes(),
        }
        print(json.dumps(result), flush=True)
        recipe.cleanup()


def _peak_gpu_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


if __name__ == "__main__":
    run_then_exit(lambda: measure(sys.argv[1:]))

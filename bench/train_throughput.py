"""Tokens/s of the main job under ZeRO-2 on 2 CPU ranks for fft, lora, molf, molf-efficient.

    .venv/bin/python -m bench.train_throughput [--steps 60]

Runs `launch/deepspeed.sh` once per mode (same model, data, batch and ds_config), reads each
run's metrics.jsonl and prints one JSON line: the last logged tokens/s of each mode, their ratios
to fft, and the share of wall time each run spent waiting for batches (the data pipeline's
cost; target under 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("fft", "lora", "molf", "molf-efficient")


def run_mode(mode: str, steps: int, root: Path) -> dict:
    out = root / mode
    extra = ["lora_ranks=[8,16]"] if mode == "molf-efficient" else []
    command = [
        "bash",
        str(REPO / "launch" / "deepspeed.sh"),
        f"output_dir={out}",
        f"mode={mode}",
        f"max_steps={steps}",
        f"log_every={steps}",
        "eval_examples=1",
        *extra,
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"tokens_per_s": last["tokens_per_s"], "data_wait_share": last["data_wait_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(mode, args.steps, Path(tmp)) for mode in MODES}
    fft = results["fft"]["tokens_per_s"]
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "setup": "main job defaults (small-qwen2), ZeRO-2, 2 CPU ranks, embedded SQL task",
                "steps": args.steps,
                "tokens_per_s": {m: round(r["tokens_per_s"], 1) for m, r in results.items()},
                "ratio_to_fft": {m: round(r["tokens_per_s"] / fft, 3) for m, r in results.items()},
                "data_wait_share": {m: round(r["data_wait_share"], 4) for m, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

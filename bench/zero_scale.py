"""MoLF under DeepSpeed ZeRO: memory per rank, collectives and time per step; prints JSON.

    DS_ACCELERATOR=cpu .venv/bin/python -m bench.zero_scale      # CPU ranks over gloo (~5 min)

Every figure comes from real `deepspeed --num_gpus N bench/zero_worker.py` jobs on the same
Qwen2-like model (4 layers, hidden 512, MLP 1408, LoRA rank 16 on all seven projections):

- memory: the fp32 master + AdamW moments each rank holds for the full-rank parameters (FFT
  experts, embeddings, norms: what ZeRO shards while LoRA factors stay resident), on 1, 2 and 4
  ranks (ZeRO-2 and ZeRO-3), against 1/N of the single-rank figure (target: within 2 %);
  and per-rank optimizer-state bytes under ZeRO-2 on 2 ranks for FFT (AdamW), LoRA (PEFT),
  MoLF, MoLF with optimizer offload, MoLF-Efficient, split by the device holding them;
- communication: collectives in one training step, MoLF against AdamW FFT, per stage (target:
  exactly one more all-reduce, of modules x experts numbers);
- time: median training step of MoLF against AdamW FFT under ZeRO-2 on 2 ranks (target
  <= 1.20), and the offloaded engine step against DeepSpeed's CPU Adam (target <= 2.0); and
  the Python part of the routed step that grows with the model, cutting the partition into
  segments (``segment_source_s``, also in each MoLF record of ``bench/zero_worker.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from molf_ds.train.distributed import free_port

HERE = Path(__file__).resolve().parent
MODEL_ARGS = ["--layers", "4", "--hidden", "512", "--mlp", "1408", "--rank", "16"]


def launch(ranks: int, runs: list[str], steps: int) -> dict[str, dict]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(port),
            str(HERE / "zero_worker.py"),
            "--runs",
            ",".join(runs),
            "--out",
            out,
            "--steps",
            str(steps),
            *MODEL_ARGS,
        ]
        env = {
            **os.environ,
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            sys.exit(f"benchmark job failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        with open(out) as f:
            return {record["run"]: record for record in json.load(f)}


def memory_scaling(results: dict[int, dict], stage: int) -> dict:
    single = results[1][f"molf:{stage}"]["ranks"][0]["full_rank_state_bytes"]
    out = {"single_rank_bytes": single}
    for world in (2, 4):
        per_rank = [r["full_rank_state_bytes"] for r in results[world][f"molf:{stage}"]["ranks"]]
        worst = max(abs(b / (single / world) - 1) for b in per_rank)
        out[f"{world}_ranks"] = {"per_rank_bytes": per_rank, "max_deviation_from_1_over_n": worst}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    two = [
        "fft:1",
        "molf:1",
        "fft:2",
        "molf:2",
        "fft:3",
        "molf:3",
        "lora:2",
        "molf:2:offload",
        "molf-efficient:2",
        "ds-cpu-adam:2:offload",
    ]
    results = {
        1: launch(1, ["molf:2", "molf:3"], args.steps),
        2: launch(2, two, args.steps),
        4: launch(4, ["molf:2", "molf:3"], args.steps),
    }
    by_run = results[2]

    def rank0(run: str) -> dict:
        return by_run[run]["ranks"][0]

    table = {
        name: {
            "optimizer_state_bytes_per_rank": rank0(run)["optimizer_state_bytes"],
            "by_device": rank0(run)["by_device"],
            "trainable_params": rank0(run)["trainable_params"],
        }
        for name, run in [
            ("fft_adamw", "fft:2"),
            ("lora_peft", "lora:2"),
            ("molf", "molf:2"),
            ("molf_offload", "molf:2:offload"),
            ("molf_efficient", "molf-efficient:2"),
        ]
    }
    communication = {}
    for stage in (1, 2, 3):
        molf, fft = rank0(f"molf:{stage}"), rank0(f"fft:{stage}")
        extra = {
            k: molf["collectives_per_step"].get(k, 0) - fft["collectives_per_step"].get(k, 0)
            for k in set(molf["collectives_per_step"]) | set(fft["collectives_per_step"])
        }
        communication[f"zero{stage}"] = {
            "molf": molf["collectives_per_step"],
            "fft_adamw": fft["collectives_per_step"],
            "molf_minus_fft": {k: v for k, v in extra.items() if v},
            "routing_all_reduce_numel": molf["routing_numbers"],
            "molf_all_reduce_numels": molf["all_reduce_numels"],
        }
    timing = {
        "zero2_molf_train_step_s": rank0("molf:2")["median_train_step_s"],
        "zero2_fft_adamw_train_step_s": rank0("fft:2")["median_train_step_s"],
        "zero2_offload_molf_engine_step_s": rank0("molf:2:offload")["median_engine_step_s"],
        # Python per step: cutting the partition into segments
        "zero2_offload_molf_segment_source_s": rank0("molf:2:offload")["segment_source_s"],
        "zero2_offload_ds_cpu_adam_engine_step_s": rank0("ds-cpu-adam:2:offload")[
            "median_engine_step_s"
        ],
    }
    timing["molf_over_fft"] = (
        timing["zero2_molf_train_step_s"] / timing["zero2_fft_adamw_train_step_s"]
    )
    timing["offload_molf_over_ds_cpu_adam"] = (
        timing["zero2_offload_molf_engine_step_s"]
        / timing["zero2_offload_ds_cpu_adam_engine_step_s"]
    )
    print(
        json.dumps(
            {
                "benchmark": "zero_scale",
                "model": " ".join(MODEL_ARGS),
                "memory_zero2": memory_scaling(results, 2),
                "memory_zero3": memory_scaling(results, 3),
                "zero2_two_ranks_table": table,
                "communication": communication,
                "time": timing,
            }
        )
    )


if __name__ == "__main__":
    main()

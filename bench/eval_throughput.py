"""Examples/s of each task's batched evaluation against one example at a time.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.eval_throughput [--examples 32] [--batch-size 16]

The main job's model (tiny-qwen2, untrained: the SQL task's greedy generation then runs to its
budget of 128 new tokens, the worst case) evaluates ``--examples`` records of each task — the
embedded generated SQL task, and the made-up MedMCQA and CounterFact records of tests/fixtures/
repeated — at batch size 1 and at ``--batch-size``, in one process; prints one JSON line of
examples/s per task and batch size, and checks that both batch sizes give the same metrics.
One thread (``OMP_NUM_THREADS=1``): on a shared 2-core machine two threads per process contend
with every other job and make both figures erratic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = {"med": "medmcqa.jsonl", "fact": "counterfact.json"}


def records(task, name: str, n: int) -> list[dict]:
    if name == "sql":
        return task.load("generated", seed=0)[:n]
    loaded = task.load(str(REPO / "tests" / "fixtures" / FIXTURES[name]))
    return (loaded * (n // len(loaded) + 1))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    from molf_ds.train import tasks
    from molf_ds.train.models import load_model

    torch.manual_seed(0)
    tokenizer, model = load_model("tiny-qwen2")
    model.eval()
    result = {"model": "tiny-qwen2 (untrained)", "examples": args.examples}
    for name in tasks.NAMES:
        task = tasks.get(name)
        batch = records(task, name, args.examples)
        task.evaluate(model, tokenizer, batch[:2], batch_size=2)  # warm-up
        one = task.evaluate(model, tokenizer, batch, batch_size=1)
        many = task.evaluate(model, tokenizer, batch, batch_size=args.batch_size)
        same = {k: v for k, v in one.items() if k != "examples_per_s"} == {
            k: v for k, v in many.items() if k != "examples_per_s"
        }
        result[name] = {
            "examples_per_s_batch_1": round(one["examples_per_s"], 1),
            f"examples_per_s_batch_{args.batch_size}": round(many["examples_per_s"], 1),
            "speedup": round(many["examples_per_s"] / one["examples_per_s"], 2),
            "same_metrics": same,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Evaluate an exported (merged) model on held-out records: completion loss and the task's metric.

Loads the plain Hugging Face export, so the score is that of what a user ships, not of the
training engine's view of the weights. Everything runs in batches (`tasks.scoring`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molf_ds.train.data import IGNORE_INDEX, encode_prompts, leaves_a_target


def heldout_problem(
    records: list[dict], *, task: Any, tokenizer: Any, max_length: int
) -> str | None:
    """Why the evaluation at the end could not score ``records`` (the held-out records it will
    get), or None: checked at set-up, so a run never fails after training for it. The held-out
    loss drops a prompt that fills ``max_length`` (as training does); if every prompt does,
    nothing is left to score."""
    if not records:
        return None
    examples = task.to_examples(records) if task is not None else records
    prompts = encode_prompts(tokenizer, [e["prompt"] for e in examples])
    if any(leaves_a_target(p, max_length) for p in prompts):
        return None
    shortest = min(len(p) for p in prompts)
    return (
        f"`max_length`={max_length} cannot hold any of the {len(records)} held-out prompts "
        f"the evaluation at the end scores (the shortest is {shortest} tokens): raise "
        f"max_length to at least {shortest + 1}, or set eval_fraction=0 to train without "
        "evaluation"
    )


def heldout_note(held_out: int, eval_examples: int, eval_fraction: float) -> str | None:
    """The set-up line saying what the evaluation at the end will score, where that is not
    simply ``eval_examples`` held-out records: none, or all of fewer."""
    if held_out == 0:
        why = "eval_fraction=0" if eval_fraction == 0 else "the held-out split is empty"
        return f"evaluation off: {why} (no held-out records); eval.json will say 0 examples"
    if held_out < eval_examples:
        return f"evaluation on all {held_out} held-out records (eval_examples={eval_examples})"
    return None


def evaluate_merged(
    model_dir: str | Path,
    records: list[dict],
    *,
    task: Any = None,
    max_length: int = 256,
    batch_size: int = 16,
) -> dict:
    """``examples``, held-out ``loss`` (mean over completion tokens) and, with a ``task``
    (`molf_ds.train.tasks.Task`; ``records`` in its schema), the task's metric and its
    ``examples_per_s``. Without one, ``records`` are prompt/completion pairs and
    ``examples_per_s`` is the loss pass's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf_ds.train.tasks.base import Timer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result: dict = {"examples": len(records)}
    if not records:
        return result
    timer = Timer()
    examples = task.to_examples(records) if task is not None else records
    result["loss"] = heldout_loss(model, tokenizer, examples, max_length, batch_size)
    result["examples_per_s"] = timer.rate(len(records))
    if task is not None:
        result.update(task.evaluate(model, tokenizer, records, batch_size=batch_size))
    return result


def heldout_loss(
    model: Any, tokenizer: Any, examples: list[dict], max_length: int, batch_size: int
) -> float:
    """Mean negative log-likelihood per completion token (and eos), tokenized as in training."""
    from molf_ds.train import data
    from molf_ds.train.tasks import scoring

    pairs = []
    for example in data.tokenize(examples, tokenizer, max_length):
        # the prompt is the labels' masked prefix (tokenize keeps at least one target token)
        n_prompt = next(i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)
        pairs.append((example["input_ids"][:n_prompt], example["input_ids"][n_prompt:]))
    scores = scoring.sequence_logprobs(
        model, pairs, pad=scoring.pad_id(tokenizer), batch_size=batch_size
    )
    return -sum(total for total, _ in scores) / max(sum(n for _, n in scores), 1)

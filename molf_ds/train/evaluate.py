"""Evaluate an exported (merged) model on held-out prompt/completion records.

Loads the plain Hugging Face export, so the score is that of what a user ships, not of the
training engine's view of the weights.
"""

from __future__ import annotations

from pathlib import Path


def evaluate_merged(
    model_dir: str | Path,
    records: list[dict],
    *,
    exact_match: bool,
    max_length: int = 256,
    max_new_tokens: int = 64,
) -> dict:
    """Held-out completion loss, and (for the SQL task) exact match of greedy generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf_ds.train import data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result: dict = {"examples": len(records)}
    if not records:
        return result
    examples = data.tokenize(records, tokenizer, max_length)
    with torch.no_grad():
        total, count = 0.0, 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
        result["loss"] = total / max(count, 1)
        if exact_match:
            result["exact_match"] = _exact_match(
                model, tokenizer, records, max_new_tokens, max_length
            )
    return result


def _exact_match(
    model, tokenizer, records: list[dict], max_new_tokens: int, max_length: int
) -> float:
    import torch

    from molf_ds.train.data import encode_prompts
    from molf_ds.train.sql_task import exact_match

    hits = 0
    prompts = encode_prompts(tokenizer, [record["prompt"] for record in records])
    for record, prompt_ids in zip(records, prompts, strict=True):
        prompt = torch.tensor([prompt_ids])  # encoded exactly as in training
        # never past max_length in all, as in training (nor past the model's positions)
        budget = max(1, min(max_new_tokens, max_length - prompt.shape[1]))
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        hits += exact_match(text.split("\n")[0], record["completion"])
    return hits / len(records)

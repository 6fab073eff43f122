"""Batched evaluation primitives every task shares: log-likelihood scoring and greedy generation.

Both take text the way training feeds it — the prompt encoded by `data.encode_prompts` (with the
tokenizer's BOS, if it adds one), the completion encoded without special tokens and appended —
so a model is scored on exactly the token sequences it learned from.

Batches are **left-padded** with an attention mask and position ids counted from each row's
first real token: every row's last token then sits in the last column (generation continues
all rows at once; scoring keeps only the last columns' logits) and each row sees what it would
see alone. Rows are grouped by length, so a batch pads little; results come back in input order
and equal those of one example at a time up to float rounding (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

Ids = list[int]


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad, else its eos (masked out either way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of at most ``batch_size``, longest first, so rows of a batch are of
    similar length (little padding) and the first batch shows the peak memory at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def left_pad(
    rows: Sequence[Ids], pad: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of ``rows`` padded on the left.

    Position ids count from each row's first real token (0 on the padding), as if the row were
    alone: models with absolute positions need it, and rotary ones then see the same angles.
    """
    width = max(len(row) for row in rows)
    ids = [[pad] * (width - len(row)) + list(row) for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
) -> list[tuple[Ids, Ids]]:
    """``(prompt ids, completion ids)`` per pair, encoded as `data.tokenize` encodes them."""
    from molf_ds.train.data import encode_prompts

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return []
    prompt_ids = encode_prompts(tokenizer, prompts)
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return list(zip(prompt_ids, completion_ids, strict=True))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _keeps_logits(model: Any) -> bool:
    """Whether ``model.forward`` can return only the last positions' logits (``logits_to_keep``,
    most causal LMs of transformers): a batch then never holds ``[rows, length, vocab]``."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def sequence_logprobs(
    model: Any, pairs: Sequence[tuple[Ids, Ids]], *, pad: int, batch_size: int = 16
) -> list[tuple[float, int]]:
    """``(sum of log-probabilities, number of tokens)`` of each pair's completion ids after its
    prompt ids, in input order. Needs at least one prompt token per pair (the first token of a
    sequence has nothing to be predicted from)."""
    for prompt, completion in pairs:
        if not prompt or not completion:
            raise ValueError("every pair needs a non-empty prompt and completion")
    device, keep = _device(model), _keeps_logits(model)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    lengths = [len(p) + len(c) for p, c in pairs]
    for batch in length_batches(lengths, batch_size):
        rows = [pairs[i][0] + pairs[i][1] for i in batch]
        inputs = left_pad(rows, pad, device)
        # the completion is a row's last tokens: position t's logits predict token t + 1, so
        # the last (longest completion + 1) positions cover every completion token of the batch
        last = max(len(pairs[i][1]) for i in batch) + 1
        extra = {"logits_to_keep": last} if keep else {}
        logits = model(**inputs, **extra).logits[:, -last:].float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = inputs["input_ids"][:, -last + 1 :]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(batch):
            n = len(pairs[i][1])
            results[i] = (float(token_logprobs[row, -n:].sum()), n)
    return results


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[tuple[float, int]]:
    """``(sum of log-probabilities, number of tokens)`` of each completion after its prompt."""
    pairs = encode_pairs(tokenizer, prompts, completions)
    return sequence_logprobs(model, pairs, pad=pad_id(tokenizer), batch_size=batch_size)


class _StopAtNewline:
    """A generation stopping criterion: a row is done once it writes a line break (answers are
    one line; without it an untrained model runs to ``max_new_tokens``). Only the newest token
    is decoded: generate keeps a row done once it was."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, -1:], skip_special_tokens=True)
        return torch.tensor(["\n" in text for text in texts], device=input_ids.device)


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    stop_at_newline: bool = False,
) -> list[str]:
    """Each prompt's greedy continuation (decoded, special tokens dropped), in input order.

    Generation ends at the tokenizer's eos (training appends it to every completion), after
    ``max_new_tokens``, or — with ``stop_at_newline`` — at the first line break. It never runs
    past the model's window (``config.max_position_embeddings``): a batch stops when its longest
    (left-padded) row fills it, and a prompt that fills it alone gets an empty answer.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    encoded = _encode(tokenizer, prompts)
    pad, device = pad_id(tokenizer), _device(model)
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    texts = [""] * len(prompts)
    # prompts that fill the window leave no room to answer: they keep the empty answer
    fits = [i for i, ids in enumerate(encoded) if window is None or len(ids) < window]
    for batched in length_batches([len(encoded[i]) for i in fits], batch_size):
        batch = [fits[j] for j in batched]
        inputs = left_pad([encoded[i] for i in batch], pad, device)
        width = inputs["input_ids"].shape[1]
        # past the window are positions the model never saw (transformers warns there)
        room = max_new_tokens if window is None else min(max_new_tokens, window - width)
        config = GenerationConfig(
            max_new_tokens=room,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        stopping = StoppingCriteriaList([_StopAtNewline(tokenizer)] if stop_at_newline else [])
        # generate derives position ids from the attention mask itself (as left_pad does)
        out = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            generation_config=config,
            stopping_criteria=stopping,
        )
        decoded = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, decoded, strict=True):
            texts[i] = text
    return texts


def _encode(tokenizer: Any, prompts: Sequence[str]) -> list[Ids]:
    from molf_ds.train.data import encode_prompts

    return encode_prompts(tokenizer, prompts) if prompts else []

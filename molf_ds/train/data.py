"""Training data: read prompt/completion records, tokenize them once, cut per-rank batches.

The pipeline is split so that the expensive part happens once: `read_dataset` and
`records_from_dataset` read and validate a local file or hub dataset (`molf_ds.train.tasks`
picks the source and schema for ``task=``), `split_records` holds out a share, `tokenize` turns
records into id lists with the loss on the completion only, and `batches` is a cheap pure
function of ``(seed, epoch, step)`` that pads one micro-batch at a time, so a resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import torch

from molf_ds.errors import MoLFError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy (and HF's loss) skips
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(MoLFError):
    """Training data that cannot be used: missing file, bad format, missing fields, ..."""


# --------------------------------------------------------------------------- loading


def split_records(
    records: Sequence[dict], *, eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Shuffle ``records`` with ``seed`` and cut off the held-out share.

    Shuffled first, so a file sorted by topic still gives a representative held-out set. With
    ``n >= 2`` records and ``eval_fraction > 0`` the held-out share is
    ``max(1, round(n * eval_fraction))`` records, at most ``n - 1`` (training never starts
    empty)."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_eval = 0
    if n >= 2 and eval_fraction > 0:
        n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return shuffled[n_eval:], shuffled[:n_eval]


HUB_HINT = "check the id, or pass 'sql' or a local " + "/".join(FILE_FORMATS) + " file"


def read_dataset(source: str, *, split: str = "train", hub_hint: str = HUB_HINT) -> Any:
    """A ``datasets.Dataset``: local files by extension, an existing folder, else a hub id.

    ``split`` is the hub dataset's (or folder's) split; a local file is one split. A source that
    cannot be read is a `DataError` of one line, ending in ``hub_hint`` for a hub id or folder
    (what to do instead: the caller knows which file schema it needs).
    """
    path = Path(source)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        return _load_file(path, fmt)
    if path.is_file():
        raise DataError(
            f"data file {source} has an unsupported format; use one of "
            f"{', '.join(FILE_FORMATS)} (or 'sql' for the embedded task)"
        )
    import datasets

    where = "folder" if path.is_dir() else "hub dataset"
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # any failure here is the user's source being unusable
        raise DataError(f"could not load {where} {source!r} ({_reason(e)}); {hub_hint}") from e


def _load_file(path: Path, fmt: str) -> Any:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path (or use data=sql)")
    try:
        return _read_csv(path) if fmt == "csv" else _read_with_datasets(path, fmt)
    except Exception as e:  # datasets/pyarrow/pandas raise many types for bad files
        if _is_blank(path):
            raise DataError(f"data file {path} has no records; add examples to it") from None
        raise DataError(
            f"could not read data file {path} as {path.suffix} ({_reason(e)}); "
            f"fix the file or re-export it as {', '.join(FILE_FORMATS)}"
        ) from e


def _read_with_datasets(path: Path, fmt: str) -> Any:
    import datasets

    if fmt == "json" and _first_byte(path) not in (b"{", b"[", b""):
        # records are objects; a file whose first value is `null` crashes the process inside
        # datasets' JSON reader (a segmentation fault; pyarrow 26.0.1, datasets 5.2.0): say it here
        raise ValueError("its first value is not a JSON object (or a list of them)")
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _first_byte(path: Path) -> bytes:
    """The first byte after a UTF-8 byte order mark and leading whitespace; b"" if none."""
    with path.open("rb") as f:
        chunk = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
        while chunk:
            if stripped := chunk.lstrip():
                return stripped[:1]
            chunk = f.read(1 << 16)
    return b""


def _read_csv(path: Path) -> Any:
    """A CSV file with every cell read as text: a completion ``4``, ``TRUE`` or ``NA`` is that
    text, not a number, a bool or a missing value (type inference would turn the first into an
    int and the last into None). Only an empty cell is missing."""
    import datasets
    import pandas

    frame = pandas.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _is_blank(path: Path) -> bool:
    """Whether a file holds no rows: only whitespace, a lone CSV header, a 0-row Parquet file.

    `datasets` fails on these with messages that do not say "empty", so the file is checked
    after a failed load to tell an empty file from a corrupt one.
    """
    if path.suffix.lower() == ".parquet":
        return path.stat().st_size == 0 or _parquet_rows(path) == 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return len(lines) <= (1 if path.suffix.lower() == ".csv" else 0)


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception:  # not a Parquet file: corrupt, not empty
        return None


def _reason(e: BaseException) -> str:
    """One line saying why a load failed, following the chained cause for datasets' wrappers."""
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    if "error occurred while generating" in str(e) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def records_from_dataset(
    ds: Any, source: str, prompt_field: str, completion_field: str
) -> list[dict]:
    """Validated ``{"prompt", "completion"}`` records from a dataset's two columns."""
    if len(ds) == 0:
        raise DataError(f"dataset {source} has no records; add examples or use another split")
    present = ", ".join(ds.column_names)
    for name, field in (("prompt_field", prompt_field), ("completion_field", completion_field)):
        if field not in ds.column_names:
            raise DataError(
                f"dataset {source} has no {field!r} field (fields: {present}); "
                f"set {name} to the column that holds it"
            )
    try:
        prompts, completions = list(ds[prompt_field]), list(ds[completion_field])
    except UnicodeDecodeError as e:  # pyarrow's JSON reader leaves bytes unchecked until read
        raise DataError(_not_utf8(source, e)) from None
    for field, values in ((prompt_field, prompts), (completion_field, completions)):
        _check_strings(values, field, source)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]


def dataset_rows(ds: Any, source: str) -> list[dict]:
    """Every record of ``ds`` as a dict of all its columns (nested ones as dicts and lists).

    An empty dataset, or text that is not UTF-8, is one line naming ``source``.
    """
    if len(ds) == 0:
        raise DataError(f"dataset {source} has no records; add examples or use another split")
    try:
        return ds.to_list()
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(source, e)) from None


def _not_utf8(source: str, e: UnicodeDecodeError) -> str:
    return (
        f"dataset {source} holds text that is not UTF-8 ({e.reason} at byte {e.start} of a "
        "value); re-save the file as UTF-8"
    )


def _check_strings(values: Iterable[Any], field: str, source: str) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"dataset {source} record {i}: {field!r} is {type(value).__name__}, not a "
                f"string; store text in that field (quote it, or drop empty rows)"
            )


# --------------------------------------------------------------------------- tokenizing


class Examples(list):
    """Tokenized examples (a list of ``{"input_ids", "labels"}``) and what tokenizing cut.

    ``dropped`` counts records whose completion did not fit at all, ``truncated`` those whose
    completion (or final ``eos``) was cut, so a too-small ``max_length`` is visible.
    """

    def __init__(self, items: Iterable[dict] = (), *, dropped: int = 0, truncated: int = 0):
        super().__init__(items)
        self.dropped = dropped
        self.truncated = truncated


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids as training sees them (with the tokenizer's BOS, if it adds one).

    Generation at evaluation must feed prompts encoded exactly this way, so this is the one
    place that decides it.
    """
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def leaves_a_target(prompt_ids: Sequence[int], max_length: int) -> bool:
    """Whether ``max_length`` tokens hold this prompt and at least one token to learn: a prompt
    that fills them is dropped, in training and in the held-out loss alike."""
    return len(prompt_ids) < max_length


def tokenize(
    records: Sequence[dict], tokenizer: Any, max_length: int, *, report: bool = True
) -> Examples:
    """``input_ids`` = prompt + completion + eos, ``labels`` = -100 on the prompt, ids after.

    The loss then covers only what the model must learn to write. Sequences are cut at
    ``max_length``; a record whose prompt alone fills it has nothing to learn from and is
    dropped (counted in ``Examples.dropped``, and logged where ``report``: every rank tokenizes
    the same records, so a multi-rank caller reports on its main rank alone).
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too small; use at least 2 tokens")
    eos = tokenizer.eos_token_id
    if not records:
        return Examples()
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenize")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records])
    completions = tokenizer([r["completion"] for r in records], add_special_tokens=False)
    out = Examples()
    for p, c in zip(prompts, completions["input_ids"], strict=True):
        target = [*c, eos]
        if not leaves_a_target(p, max_length):
            out.dropped += 1
            continue
        out.truncated += len(p) + len(target) > max_length
        out.append(
            {
                "input_ids": (p + target)[:max_length],
                "labels": ([IGNORE_INDEX] * len(p) + target)[:max_length],
            }
        )
    _check_cuts(out, len(records), max_length, report)
    return out


def _check_cuts(out: Examples, total: int, max_length: int, report: bool) -> None:
    """An error if nothing is left (on every rank: each must stop), else the cuts logged."""
    if total and not out:
        raise DataError(
            f"all {total} prompts are at least max_length={max_length} tokens; raise max_length"
        )
    if report and (out.dropped or out.truncated):
        logger.warning(
            "max_length=%d: dropped %d and truncated %d of %d records; raise max_length to keep "
            "whole completions",
            max_length,
            out.dropped,
            out.truncated,
            total,
        )


# --------------------------------------------------------------------------- batching


def num_batches(examples: Sized | int, *, micro_batch_size: int, world_size: int = 1) -> int:
    """Global steps in one epoch: full global batches of ``micro_batch_size * world_size``."""
    n = examples if isinstance(examples, int) else len(examples)
    return n // (micro_batch_size * world_size)


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch, a pure function of ``(seed, epoch)``.

    Seeded from a string (hashed with SHA-512 by `random`), so it is the same in every
    process and Python version, independent of ``PYTHONHASHSEED``.
    """
    order = list(range(num_examples))
    random.Random(f"molf-data:{seed}:{epoch}").shuffle(order)
    return order


def batches(
    examples: Sequence[dict],
    *,
    micro_batch_size: int,
    pad_id: int,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one epoch, from global step ``start_step`` on.

    Global batch ``k`` is examples ``order[k*G:(k+1)*G]`` (``G = micro_batch_size *
    world_size``, the incomplete last one dropped) and rank ``r`` takes the ``r``-th
    ``micro_batch_size`` of them, so ranks never share an example and batch ``k`` depends only
    on ``(seed, epoch, k)``: resuming with ``start_step=k`` continues the same stream. With
    gradient accumulation a step here is one micro-step (pass ``optimizer_step * accum``).
    Sequences are right-padded with ``pad_id`` (labels -100, attention mask 0).
    """
    _check_batching(len(examples), micro_batch_size, world_size, rank, start_step)
    order = epoch_order(len(examples), seed=seed, epoch=epoch)
    size = micro_batch_size * world_size
    for step in range(start_step, num_batches(len(examples), micro_batch_size=size)):
        first = step * size + rank * micro_batch_size
        yield collate([examples[i] for i in order[first : first + micro_batch_size]], pad_id)


def _check_batching(n: int, micro_batch_size: int, world_size: int, rank: int, start: int) -> None:
    if micro_batch_size < 1 or world_size < 1:
        raise DataError(
            f"micro_batch_size={micro_batch_size}, world_size={world_size}: both must be >= 1"
        )
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is outside 0..{world_size - 1}; pass this process's rank")
    if num_batches(n, micro_batch_size=micro_batch_size, world_size=world_size) == 0:
        raise DataError(
            f"{n} examples do not fill one global batch of {micro_batch_size * world_size} "
            f"(micro_batch_size x world_size); lower micro_batch_size or add data"
        )
    if start < 0:
        raise DataError(f"start_step={start} is negative; pass the number of steps already done")


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` to their longest into ``input_ids``/``labels``/``attention_mask``."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        ids.append(e["input_ids"] + [pad_id] * pad)
        labels.append(e["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(e["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }

"""Full disks and interrupted saves: what molf-train checks before it writes, and how a
checkpoint is published only when complete.

A checkpoint ``checkpoints/stepN`` exists only complete. Every rank writes its DeepSpeed files
under the staging tag ``stepN.partial``; once every rank has written them without error (one
agreement across ranks), rank 0 fsyncs them, renames the directory to ``stepN`` — the commit —
and then replaces ``latest`` atomically (temporary file, fsync, ``os.replace``). A job killed at
any moment leaves at most a ``*.partial`` leftover, which ``resume=auto`` never reads (it takes the
newest ``stepN``) and the next save removes. The files inside are DeepSpeed's own, so
``engine.load_checkpoint``, ``zero_to_fp32`` and ``ds_to_universal`` read them as before; under
``engine=fsdp2`` they are ``torch.distributed.checkpoint``'s (`engines.FSDP2Engine`), published
the same way.

DeepSpeed 0.19.8's ``save_checkpoint`` alone is not atomic: rank 0 writes ``latest`` in place
(truncate, then write) right after its own files, before the barrier that waits for the other
ranks' shards, so a kill can leave ``latest`` empty or naming a checkpoint with shards missing.

A write that fails (full disk, read-only or vanished file system) on any rank fails the save on
every rank with the same one-line message (`EveryRankError`): ranks must leave together, since a
rank that raised alone would leave the others waiting in the next collective.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from molf_ds import ds_partitions
from molf_ds.errors import EveryRankError
from molf_ds.train.distributed import agree, is_main_rank

STAGING_SUFFIX = ".partial"
LATEST = "latest"
TAG = re.compile(r"step(\d+)")
# Bytes per trainable parameter in a checkpoint's optimizer shards: fp32 master, exp_avg and
# exp_avg_sq (MoLFAdamW and AdamW alike), over all ranks together.
OPTIMIZER_BYTES_PER_PARAMETER = 12
# What a checkpoint holds besides tensors (pickled config and client state, DeepSpeed's two
# recovery scripts) and what a run writes besides checkpoints and exported weights (metrics,
# routing log, TensorBoard, figures, tokenizer files): measured 0.1 MiB and 0.2 MiB for MoLF
# on tiny-qwen2; rounded up, so that small models are not refused for want of a few KiB.
CHECKPOINT_OVERHEAD = 256 * 1024
RUN_FILES_OVERHEAD = 1024 * 1024
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent: where a directory about to be made would live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def tree_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def writable_problem(output_dir: Path) -> str | None:
    """Why ``output_dir`` cannot be written, or None. Tried for real (a directory made and
    removed where the run will write): permission bits say nothing to root or on a read-only
    mount."""
    target = existing_ancestor(output_dir)
    if not target.is_dir():
        return f"`output_dir` {output_dir}: {target} is a file: give a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".molf-write-test-", dir=target))
    except OSError as err:
        return (
            f"`output_dir` {output_dir} cannot be written ({err.strerror} in {target}): "
            "choose a writable output_dir or fix its permissions"
        )
    return None


def space_problem(output_dir: Path, checkpoint: int, exports: int, reclaimable: int) -> str | None:
    """Why the run will not fit in ``output_dir``'s file system, or None: it needs room for one
    checkpoint and the exports; ``reclaimable`` is what the run deletes first (overwrite=true)."""
    needed = checkpoint + exports
    free = free_bytes(output_dir) + reclaimable
    if free >= needed:
        return None
    return (
        f"`output_dir` {output_dir} has {mib(free)} free but the run needs about {mib(needed)} "
        f"(one checkpoint {mib(checkpoint)} + exports {mib(exports)}): free space or choose "
        "another output_dir"
    )


def checkpoint_estimate(model: Any) -> int:
    """Bytes of one DeepSpeed checkpoint of ``model`` over all ranks: the module's weights (rank
    0's model states) and 12 bytes per trainable parameter (the optimizer shards)."""
    params = list(model.parameters())
    weights = sum(_numel(p) * p.element_size() for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    return weights + OPTIMIZER_BYTES_PER_PARAMETER * trainable + CHECKPOINT_OVERHEAD


def exports_estimate(model: Any, copies: int) -> int:
    """Bytes of the exports: ``copies`` full models (merged; MoLF-Efficient adds the base) in
    fp32 at most, and the run's small files."""
    numel = sum(_numel(p) for p in model.parameters())
    return copies * 4 * numel + RUN_FILES_OVERHEAD


def _numel(param: Any) -> int:
    """Elements of the whole parameter, also when ``deepspeed.zero.Init`` built it partitioned
    (its local tensor is then empty; ``ds_numel`` is DeepSpeed's documented full size)."""
    return int(getattr(param, "ds_numel", param.numel()))


def write_problem(err: Exception, what: str, where: Path, needed: int) -> str | None:
    """The one-line message for a failed write of ``what`` under ``where``, or None when the
    failure is not the disk's. torch.save reports a full disk as a bare RuntimeError from its zip
    writer, so a disk with less than ``needed`` bytes free counts as full whatever the error."""
    free = free_bytes(where)
    full = isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS
    if full or free < needed:
        return (
            f"no space left on the device of {where} while writing {what} "
            f"(needs about {mib(needed)})"
        )
    if isinstance(err, OSError):
        return f"cannot write {what} in {where}: {err.strerror or err}"
    return None


def complete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints in ``ckpt_dir``, oldest first (``*.partial`` leftovers of
    interrupted saves are not checkpoints)."""
    if not ckpt_dir.is_dir():
        return []
    steps = [int(m.group(1)) for d in ckpt_dir.iterdir() if (m := TAG.fullmatch(d.name))]
    return [f"step{s}" for s in sorted(steps)]


def newest_checkpoint(ckpt_dir: Path) -> str | None:
    """The tag ``resume=auto`` continues from: the newest complete checkpoint."""
    tags = complete_checkpoints(ckpt_dir)
    return tags[-1] if tags else None


def save_checkpoint(
    engine: Any, ckpt_dir: Path, step: int, client_state: dict, needed: int
) -> None:
    """Collective: save ``engine``'s checkpoint (DeepSpeed's, or DCP's under FSDP2) as
    ``ckpt_dir/step{step}``, published only once every rank's files are written; ``needed``
    (bytes) goes into a full disk's message. Raises `EveryRankError` on every rank when any rank
    fails to write, the previous checkpoint untouched and no leftover of this one."""
    tag = f"step{step}"
    staging = ckpt_dir / f"{tag}{STAGING_SUFFIX}"
    main = is_main_rank()

    def on_main(write: Callable[[], None]) -> str | None:
        """Rank 0 runs ``write``; the problem it met, if any (None elsewhere)."""
        return _attempt(write, f"checkpoint {tag}", ckpt_dir, needed) if main else None

    agree(on_main(lambda: _prepare(ckpt_dir)))
    problem = None
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=staging.name, client_state=client_state, save_latest=False
        )
    except Exception as err:  # noqa: BLE001 - classified below; a bug is re-raised
        problem = write_problem(err, f"checkpoint {tag}", ckpt_dir, needed)
        if problem is None:
            raise
        if dist.is_initialized():  # meet the others in the collectives this rank skipped
            ds_partitions.finish_failed_save(engine)
    try:
        agree(problem)
        agree(on_main(lambda: _publish(ckpt_dir, staging, tag)))
    except EveryRankError as err:
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # give the space back
        raise EveryRankError(f"{err}; {_kept(ckpt_dir)}") from None


def _kept(ckpt_dir: Path) -> str:
    tag = newest_checkpoint(ckpt_dir)
    if tag is None:
        return "no checkpoint was saved before: free space and start again"
    return f"checkpoint {tag} is intact: free space, then resume=auto continues from it"


def _attempt(write: Callable[[], None], what: str, where: Path, needed: int) -> str | None:
    try:
        write()
    except Exception as err:  # noqa: BLE001 - classified; a bug is re-raised
        problem = write_problem(err, what, where, needed)
        if problem is None:
            raise
        return problem
    return None


def _prepare(ckpt_dir: Path) -> None:
    """Make ``ckpt_dir`` and remove what interrupted saves left (this save's name included)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ckpt_dir.glob(f"*{STAGING_SUFFIX}"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _publish(ckpt_dir: Path, staging: Path, tag: str) -> None:
    """Rank 0, once every rank's files are in ``staging``: make them durable, rename (the
    commit), then point ``latest`` at the new tag for DeepSpeed's own tools."""
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(staging)
    final = ckpt_dir / tag
    if final.exists():  # the same step saved before (a resume that went back): replaced
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync(ckpt_dir)
    write_atomic(ckpt_dir / LATEST, tag)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` all at once: readers see the old or the new."""
    temporary = path.with_name(path.name + STAGING_SUFFIX)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Full disks and interrupted saves, provoked for real on `molf-train` (2 CPU ranks, ZeRO-2).

A full disk is a real tmpfs too small for the run; an unwritable output directory a read-only
tmpfs; an interrupted save the whole launcher's process group killed (SIGKILL) while it saves.
Expected weights come from the same job run straight through.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molf_ds.train import storage
from tests.launch import REPO, cpu_env, free_port, run_group

ARGS = [
    "model=tiny-qwen2",  # the disk sizes below are its checkpoints' and exports'
    "max_steps=6",
    "save_every=1",
    "micro_batch_size=2",
    "eval_examples=1",
    "log_every=2",
    "max_length=224",
    "warmup_steps=2",
    "lr=3e-3",
]
# What a 2-rank ZeRO-2 checkpoint of molf-train holds (rank 0's model states, one shard a rank).
CHECKPOINT_FILES = {
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
}
KILLS = 5


def _command(args: list[str], ranks: int) -> tuple[list[str], dict[str, str]]:
    env = cpu_env()
    env["MASTER_PORT"] = str(free_port())
    if ranks == 1:
        return [sys.executable, "-m", "molf_ds.train", *args], env
    env.update(PYTHON=sys.executable, NUM_GPUS=str(ranks))
    return ["bash", str(REPO / "launch" / "deepspeed.sh"), *args], env


def _train(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    command, env = _command(args, ranks)
    return run_group(command, env, timeout=300)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "molf-train: error:" in line]


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode != 0, output
    assert "Traceback" not in result.stdout + result.stderr, output
    errors = _error_lines(result)
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _assert_complete(ckpt_dir: Path, tag: str) -> None:
    """Every file of ``tag`` is there and loads whole."""
    files = {p.name for p in (ckpt_dir / tag).iterdir()}
    assert files == CHECKPOINT_FILES, (tag, files)
    for name in files:
        torch.load(ckpt_dir / tag / name, map_location="cpu", weights_only=False)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "merged" / "model.safetensors"))


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """``mount(name, size, *options)``: a real tmpfs at ``tmp_path/name``; unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = ",".join([f"size={size}", *options])
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=False)
        if done.returncode != 0:
            pytest.fail("mounting a tmpfs needs root (the CI runs these tests as root)")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    result = _train([f"output_dir={out}", *ARGS])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


# ---- which checkpoint resume=auto takes -----------------------------------------------------
def test_resume_auto_takes_the_newest_complete_checkpoint_by_step(tmp_path) -> None:
    for name in ("step2", "step10", "step9", f"step11{storage.STAGING_SUFFIX}", "notes"):
        (tmp_path / name).mkdir()
    assert storage.complete_checkpoints(tmp_path) == ["step2", "step9", "step10"]
    assert storage.newest_checkpoint(tmp_path) == "step10"
    assert storage.newest_checkpoint(tmp_path / "missing") is None


# ---- checked before anything is written ----------------------------------------------------
@pytest.mark.slow
def test_too_small_disk_is_refused_before_anything_is_written(tmpfs) -> None:
    out = tmpfs("small", "2m") / "run"
    result = _train([f"output_dir={out}", *ARGS], ranks=1)
    _assert_one_line_error(result, str(out), "free but the run needs about", "MiB")
    assert not out.exists()


@pytest.mark.slow
def test_unwritable_output_dir_is_refused(tmpfs) -> None:
    out = tmpfs("readonly", "1m", "ro") / "run"
    result = _train([f"output_dir={out}", *ARGS], ranks=1)
    _assert_one_line_error(result, str(out), "cannot be written", "Read-only file system")


# ---- the disk fills during a checkpoint --------------------------------------------------
@pytest.mark.slow
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmpfs, straight_run) -> None:
    """8 MiB: set-up passes (one checkpoint + exports fit), step 1's checkpoint (4.3 MiB) is
    written, step 2's fills the disk halfway. Then, with room again, resume=auto continues from
    step 1 and ends bitwise like the straight run."""
    disk = tmpfs("disk", "8m")
    out = disk / "run"
    ckpt = out / "checkpoints"
    result = _train([f"output_dir={out}", *ARGS])
    error = _assert_one_line_error(result, str(ckpt), "no space left", "checkpoint step2")
    needed = storage.tree_bytes(ckpt / "step1")
    assert f"(needs about {storage.mib(needed)})" in error
    assert storage.complete_checkpoints(ckpt) == ["step1"]
    assert (ckpt / "latest").read_text() == "step1"
    assert not list(ckpt.glob(f"*{storage.STAGING_SUFFIX}"))  # the space was given back
    _assert_complete(ckpt, "step1")

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = _train([f"output_dir={out}", *ARGS, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "at step 1" in resumed.stdout
    _assert_bitwise_equal(out, straight_run)


# ---- killed while saving -----------------------------------------------------------------
def _saving(ckpt_dir: Path) -> set[str]:
    return {p.name for p in ckpt_dir.glob(f"step*{storage.STAGING_SUFFIX}")}


def _kill_during_a_save(args: list[str], ckpt_dir: Path, rng: random.Random) -> bool:
    """Start the job; during its first or second save (a random pick), after a random 0-40 ms,
    SIGKILL the launcher's whole process group. Returns whether a save was interrupted (its
    staging files left behind; False if the job ended first)."""
    command, env = _command(args, ranks=2)
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, seen, target = time.monotonic() + 300, set(), 1 + rng.randrange(2)
        while len(seen) < target or not _saving(ckpt_dir):
            seen |= _saving(ckpt_dir)
            if proc.poll() is not None:  # finished (a chain of late kills): nothing to cut
                return False
            assert time.monotonic() < deadline, "no save started"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.04))
    finally:
        with contextlib.suppress(ProcessLookupError):  # (a group that ended by itself)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return bool(list(ckpt_dir.glob(f"*{storage.STAGING_SUFFIX}")))


@pytest.mark.slow
def test_killed_saves_never_leave_resume_auto_a_partial_checkpoint(tmp_path, straight_run) -> None:
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    rng = random.Random(1234)
    interrupted = 0
    for _ in range(KILLS):
        interrupted += _kill_during_a_save([f"output_dir={out}", *ARGS, "resume=auto"], ckpt, rng)
        tag = storage.newest_checkpoint(ckpt)
        if tag is not None:  # what resume=auto would load is whole, and so is `latest`'s
            _assert_complete(ckpt, tag)
            latest = (ckpt / "latest").read_text()
            assert latest in storage.complete_checkpoints(ckpt)
            _assert_complete(ckpt, latest)
    assert interrupted >= 2, "the kills missed the saves: nothing was tested"
    final = _train([f"output_dir={out}", *ARGS, "resume=auto"])
    assert final.returncode == 0, final.stderr[-4000:]
    assert not list(ckpt.glob(f"*{storage.STAGING_SUFFIX}"))  # leftovers cleaned by the saves
    _assert_bitwise_equal(out, straight_run)


# ---- the disk fills during the exports --------------------------------------------------
def _fill_once_saved(ckpt_dir: Path, tag: str, filler: Path, stop: threading.Event) -> None:
    """Once ``latest`` names ``tag`` (the final checkpoint is published), fill the disk."""
    while not stop.is_set():
        latest = ckpt_dir / "latest"
        if latest.is_file() and latest.read_text() == tag:
            with contextlib.suppress(OSError), open(filler, "wb") as handle:
                while True:
                    handle.write(bytes(1 << 16))
                    handle.flush()
            return
        time.sleep(0.002)


@pytest.mark.slow
def test_disk_full_during_the_exports_keeps_the_final_checkpoint(tmpfs, straight_run) -> None:
    """The disk is filled (by another writer) once the final checkpoint is published, before the
    exports. With room again, resume=auto writes the exports from that checkpoint."""
    disk = tmpfs("disk", "16m")
    out = disk / "run"
    ckpt = out / "checkpoints"
    filler = disk / "filler"
    stop = threading.Event()
    watcher = threading.Thread(target=_fill_once_saved, args=(ckpt, "step6", filler, stop))
    watcher.start()
    try:
        result = _train([f"output_dir={out}", *ARGS, "save_every=0"])
    finally:
        stop.set()
        watcher.join()
    assert filler.stat().st_size > 0, "the disk was not filled: nothing was tested"
    _assert_one_line_error(
        result, str(out), "no space left", "the exports", "needs about", "step6 is intact"
    )
    assert storage.complete_checkpoints(ckpt) == ["step6"]
    _assert_complete(ckpt, "step6")

    filler.unlink()
    resumed = _train([f"output_dir={out}", *ARGS, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "at step 6" in resumed.stdout
    _assert_bitwise_equal(out, straight_run)

"""`molf_ds.hf` in real Hugging Face runs: `transformers.Trainer` with ``deepspeed=``, TRL's
`SFTTrainer` through `MoLFMixin`, and `accelerate launch` with a DeepSpeed plugin.

Every run is a real job on CPU ranks over gloo (the deepspeed launcher, ``accelerate launch``, or
one plain process) with a tiny Qwen2 loaded by ``from_pretrained`` from a directory the module
fixture writes. Expected values come from another run, never from constants: a single-process
Trainer (every sequence has one length and no padding, so a global batch's loss is the same
token mean however it is split over ranks), a straight run for a resumed one, the trained
model's own logits for what reloads without molf_ds, and `molf_ds.initialize` under the
deepspeed launcher for the accelerate example.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import launch

pytestmark = pytest.mark.slow  # real multi-rank jobs

ZERO2, ZERO3 = "ds_configs/zero2.json", "ds_configs/zero3.json"
ZERO3_OFFLOAD = "ds_configs/zero3_offload.json"
ATOL = 1e-5  # fp32 sums reduced in another order across ranks
STEPS, SPLIT = 4, 2  # checkpoint-2 of a 4-step run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    launch.python("hf_trainer.py", "base", str(directory / "base"))
    return directory


def _train(root: Path, name: str, *flags: str, ranks: int = 0, deepspeed: str = "") -> dict:
    """A run of tests/workers/hf_trainer.py: ``ranks`` CPU ranks under the deepspeed launcher,
    or (``ranks=0``) one plain process with the same global batch of 4 and no DeepSpeed."""
    args = ["train", "--base", str(root / "base"), "--out", str(root / name), *flags]
    if ranks:
        launch.deepspeed(ranks, "hf_trainer.py", *args, "--micro", str(4 // ranks),
                         "--deepspeed", deepspeed)  # fmt: skip
    else:
        launch.python("hf_trainer.py", *args, "--micro", "4")
    return torch.load(root / name / "result.pt")


@pytest.fixture(scope="module")
def plain(root) -> dict:
    return _train(root, "plain")


@pytest.fixture(scope="module")
def zero3(root) -> dict:
    """ZeRO-3 on 2 ranks, a checkpoint at step 2 of 4."""
    return _train(root, "zero3", "--save-steps", str(SPLIT), ranks=2, deepspeed=ZERO3)


def _assert_same_params(run: dict, reference: dict, atol: float = ATOL) -> None:
    assert run["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(run["params"][name], value, rtol=0, atol=atol, msg=name)


def _routing(run: dict) -> list[dict]:
    return [
        {k: v for k, v in entry.items() if k.startswith("molf/")}
        for entry in run["log_history"]
        if "loss" in entry
    ]


def _tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    return tags


def _reload(root: Path, directory: Path, probe: Path, adapter: Path | None = None) -> dict:
    """Logits of what `save_model` wrote, reloaded in a process that never imports molf_ds."""
    out = root / f"reload-{directory.parent.name}-{directory.name}.pt"
    extra = ["--adapter", str(adapter)] if adapter else []
    launch.run([sys.executable, str(launch.WORKERS / "hf_reload.py"), str(directory),
                str(probe), str(out), *extra])  # fmt: skip
    reloaded = torch.load(out)
    assert reloaded["molf_ds_imported"] == []
    assert not any(reloaded["loading_info"].values()), reloaded["loading_info"]
    return reloaded


def test_trainer_under_zero2_and_zero3_reaches_the_single_process_trainer(root, plain, zero3):
    zero2 = _train(root, "zero2", ranks=2, deepspeed=ZERO2)
    base = load_file(str(root / "base" / "model.safetensors"))
    moved = (plain["params"]["model.embed_tokens.weight"] - base["model.embed_tokens.weight"]).abs()
    assert moved.max() > 100 * ATOL  # training moved the weights far beyond the tolerance
    for run in (zero2, zero3):
        assert run["world_size"] == 2
        _assert_same_params(run, plain)
        assert _routing(run) == _routing(plain)
    # Routing is logged through Trainer.log every step, and it was a real choice.
    shares = [entry["molf/fft_share"] for entry in _routing(plain)]
    assert len(shares) == STEPS and all(0 < s < 1 for s in shares), shares
    assert any("molf/fft_share" in tag for tag in _tensorboard_tags(root / "zero3" / "runs"))
    # ZeRO-3: from_pretrained built the model partitioned (zero.Init); the LoRA factors stay
    # resident (molf_ds raised the Trainer's persistence threshold above them).
    assert zero3["zero_init"] and not zero2["zero_init"]
    assert zero3["lora_residency"] == ["whole"]


def test_resume_from_a_trainer_checkpoint_continues_the_same_trajectory(root, zero3):
    checkpoint = root / "zero3" / f"checkpoint-{SPLIT}"
    resumed = _train(root, "resumed", "--resume", str(checkpoint), ranks=2, deepspeed=ZERO3)
    _assert_same_params(resumed, zero3, atol=0)
    losses = [(e["step"], e["loss"]) for e in resumed["log_history"] if "loss" in e]
    straight = [(e["step"], e["loss"]) for e in zero3["log_history"] if "loss" in e]
    assert losses == straight  # the checkpoint's history, then the same steps 3 and 4
    # On another number of ranks: resume_from_checkpoint converts the 2-rank checkpoint to
    # DeepSpeed's universal format (with the `universal_checkpoint_info` molf_ds saved in it).
    one_rank = _train(root, "one_rank", "--resume", str(checkpoint), ranks=1, deepspeed=ZERO3)
    assert (checkpoint / f"global_step{SPLIT}_universal").is_dir()
    assert one_rank["world_size"] == 1
    _assert_same_params(one_rank, zero3)


def test_zero3_save_model_writes_a_merged_model_that_reloads_without_molf_ds(root, zero3):
    result = root / "zero3" / "result.pt"
    reloaded = _reload(root, root / "zero3" / "final", result)
    torch.testing.assert_close(reloaded["merged"], zero3["logits"], rtol=0, atol=ATOL)
    # Every intermediate checkpoint holds a merged model too, of that step's weights.
    early = _reload(root, root / "zero3" / f"checkpoint-{SPLIT}", result)
    assert (early["merged"] - zero3["logits"]).abs().max() > 100 * ATOL


def test_trl_sft_trainer_through_the_mixin_molf_efficient_under_zero3_offload(root):
    flags = ("--trl", "--efficient")
    reference = _train(root, "trl_plain", *flags)
    # With optimizer offload accelerate swaps a client optimizer for DeepSpeed's CPU Adam unless
    # the config says otherwise: matching the MoLF reference shows MoLFAdamW did the steps.
    run = _train(root, "trl_zero3", *flags, ranks=2, deepspeed=ZERO3_OFFLOAD)
    _assert_same_params(run, reference)
    assert all(entry["molf/win_share_fft"] == 0 for entry in _routing(run))  # base frozen
    assert "mean_token_accuracy" in run["log_history"][0]  # SFTTrainer's own logging ran
    final = root / "trl_zero3" / "final"
    reloaded = _reload(root, final, root / "trl_zero3" / "result.pt", adapter=final / "adapter")
    for logits in (reloaded["merged"], reloaded["adapter"]):
        torch.testing.assert_close(logits, run["logits"], rtol=0, atol=ATOL)
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == root / "base"


def _text_data(path: Path, records: int = 16, seed: int = 3) -> Path:
    rng = random.Random(seed)
    lines = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(10, 20)))
             for _ in range(records)]  # fmt: skip
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def test_accelerate_example_reaches_the_deepspeed_launchers_parameters(root):
    data = _text_data(root / "texts.jsonl")
    common = ["--model", str(root / "base"), "--data", str(data), "--steps", str(STEPS),
              "--lr", "2e-3", "--lora-lr", "1e-3", "--lora-ranks", "4", "8"]  # fmt: skip
    example = launch.REPO / "examples"
    result = launch.run([str(launch.BIN / "accelerate"), "launch", "--config_file",
                         str(example / "accelerate_deepspeed.yaml"), "--main_process_port",
                         str(launch.free_port()), str(example / "accelerate_molf.py"), *common,
                         "--out", str(root / "accelerate"), "--cpu"])  # fmt: skip
    assert "You are using ZeRO with an untested optimizer" in result.stdout + result.stderr
    assert len(re.findall(r"^step \d+ loss", result.stdout, flags=re.M)) == STEPS
    launch.deepspeed(2, "hf_custom_loop.py", "--deepspeed", ZERO2, *common,
                     "--out", str(root / "ds_loop"))  # fmt: skip
    ours = load_file(str(root / "accelerate" / "model.safetensors"))
    reference = load_file(str(root / "ds_loop" / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    assert ours.keys() == reference.keys() == base.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=ATOL, msg=name)
    assert max((ours[n] - base[n]).abs().max() for n in ours) > 100 * ATOL


def test_trainer_example_resumes_without_deepspeed(root):
    """examples/trainer_molf.py as the README runs it, in one process: a checkpoint's merged
    model reloads, and resuming from it (the wrapped weights it also holds) continues the run."""
    data = _text_data(root / "example.jsonl", records=8)
    example = str(launch.REPO / "examples" / "trainer_molf.py")
    common = ["--model", str(root / "base"), "--data", str(data), "--steps", "3",
              "--save-steps", "2", "--lr", "1e-3", "--cpu"]  # fmt: skip
    launch.run([sys.executable, example, *common, "--out", str(root / "ex")])
    launch.run([sys.executable, example, *common, "--out", str(root / "ex_resumed"),
                "--resume", str(root / "ex" / "checkpoint-2")])  # fmt: skip
    straight = load_file(str(root / "ex" / "final" / "model.safetensors"))
    resumed = load_file(str(root / "ex_resumed" / "final" / "model.safetensors"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)

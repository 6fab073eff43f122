"""`molf_ds.hf` in real Hugging Face runs: `transformers.Trainer` with ``deepspeed=`` and with
FSDP2, TRL's `SFTTrainer` through `MoLFMixin`, and `accelerate launch` with a DeepSpeed or an
FSDP2 plugin.

Every run is a real job on CPU ranks over gloo (the deepspeed launcher, torchrun, ``accelerate
launch``, or one plain process) with a tiny Qwen2 loaded by ``from_pretrained`` from a directory
the module fixture writes. Expected values come from another run, never from constants: a
single-process Trainer (every sequence has one length and no padding, so a global batch's loss is
the same token mean however it is split over ranks), a straight run for a resumed one, the
trained model's own logits for what reloads without molf_ds, and `molf_ds.initialize` under the
deepspeed launcher for the accelerate example.

accelerate 1.15 runs FSDP only on accelerator ranks; on CPU ranks the FSDP2 runs switch its FSDP
path on by hand (tests/workers/accelerate_fsdp_cpu.py), and the rest of it is accelerate's own.
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

from molf_ds.config import MoLFConfig
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


def _train(
    root: Path, name: str, *flags: str, ranks: int = 0, deepspeed: str = "", fsdp: bool = False
) -> dict:
    """A run of tests/workers/hf_trainer.py: ``ranks`` CPU ranks under the deepspeed launcher
    (or under torchrun with the Trainer's FSDP2), or (``ranks=0``) one plain process with the
    same global batch of 4 and no DeepSpeed."""
    args = ["train", "--base", str(root / "base"), "--out", str(root / name), *flags]
    if fsdp:
        launch.torchrun(ranks, "hf_trainer.py", *args, "--micro", str(4 // ranks), "--fsdp")
    elif ranks:
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


TRL_EFFICIENT = ("--trl", "--efficient")


@pytest.fixture(scope="module")
def trl_plain(root) -> dict:
    """TRL's SFTTrainer, MoLF-Efficient, in one plain process."""
    return _train(root, "trl_plain", *TRL_EFFICIENT)


def test_trl_sft_trainer_through_the_mixin_molf_efficient_under_zero3_offload(root, trl_plain):
    # With optimizer offload accelerate swaps a client optimizer for DeepSpeed's CPU Adam unless
    # the config says otherwise: matching the MoLF reference shows MoLFAdamW did the steps.
    run = _train(root, "trl_zero3", *TRL_EFFICIENT, ranks=2, deepspeed=ZERO3_OFFLOAD)
    _assert_same_params(run, trl_plain)
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


def test_trl_sft_trainer_under_fsdp2_reaches_the_single_process_trainer_and_resumes(
    root, trl_plain
):
    """The Trainer's FSDP2 (``fsdp=True, fsdp_config={"fsdp_version": 2}``) on 2 ranks: the
    Trainer builds MoLFAdamW on plain parameters, then accelerate's ``prepare`` shards the model
    and hands the optimizer the DTensors. TRL's SFTTrainer, MoLF-Efficient; a checkpoint at
    step 2 through torch.distributed.checkpoint, resumed by a new Trainer on the same ranks."""
    resumed_dir = root / "trl_fsdp2_resumed"
    run = _train(root, "trl_fsdp2", *TRL_EFFICIENT, "--save-steps", str(SPLIT),
                 "--and-resume", str(resumed_dir), ranks=2, fsdp=True)  # fmt: skip
    assert run["world_size"] == 2
    _assert_same_params(run, trl_plain)
    assert _routing(run) == _routing(trl_plain)
    checkpoint = root / "trl_fsdp2" / f"checkpoint-{SPLIT}"
    # The Trainer's own FSDP checkpoint (DCP shards of the model and of MoLFAdamW's state) beside
    # the merged model; no second copy of the wrapped weights.
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "molf_model.safetensors").exists()
    resumed = torch.load(resumed_dir / "result.pt")
    _assert_same_params(resumed, run, atol=0)
    final = root / "trl_fsdp2" / "final"
    reloaded = _reload(root, final, root / "trl_fsdp2" / "result.pt", adapter=final / "adapter")
    for logits in (reloaded["merged"], reloaded["adapter"]):
        torch.testing.assert_close(logits, run["logits"], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def loop_args(root) -> list[str]:
    """The accelerate example's arguments (the data included) shared by every run of its loop."""
    data = _text_data(root / "texts.jsonl")
    return ["--model", str(root / "base"), "--data", str(data), "--steps", str(STEPS),
            "--lr", "2e-3", "--lora-lr", "1e-3", "--lora-ranks", "4", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def ds_loop(root, loop_args) -> dict[str, torch.Tensor]:
    """The example's loop without accelerate (`molf_ds.initialize`, ZeRO-2, 2 ranks): its
    merged model."""
    launch.deepspeed(2, "hf_custom_loop.py", "--deepspeed", ZERO2, *loop_args,
                     "--out", str(root / "ds_loop"))  # fmt: skip
    return load_file(str(root / "ds_loop" / "model.safetensors"))


def _assert_same_merged(ours: dict, reference: dict, base_dir: Path) -> None:
    base = load_file(str(base_dir / "model.safetensors"))
    assert ours.keys() == reference.keys() == base.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=ATOL, msg=name)
    assert max((ours[n] - base[n]).abs().max() for n in ours) > 100 * ATOL


def _accelerate(config: str, script: Path, *args: str):
    return launch.run([str(launch.BIN / "accelerate"), "launch", "--config_file",
                       str(launch.REPO / "examples" / config), "--main_process_port",
                       str(launch.free_port()), str(script), *args, "--cpu"])  # fmt: skip


def test_accelerate_example_reaches_the_deepspeed_launchers_parameters(root, loop_args, ds_loop):
    example = launch.REPO / "examples" / "accelerate_molf.py"
    out = root / "accelerate"
    result = _accelerate("accelerate_deepspeed.yaml", example, *loop_args, "--out", str(out))
    assert "You are using ZeRO with an untested optimizer" in result.stdout + result.stderr
    assert len(re.findall(r"^step \d+ loss", result.stdout, flags=re.M)) == STEPS
    _assert_same_merged(load_file(str(out / "model.safetensors")), ds_loop, root / "base")


def test_accelerate_example_under_fsdp2_reaches_the_deepspeed_launchers_parameters(
    root, loop_args, ds_loop
):
    """examples/accelerate_molf.py with examples/accelerate_fsdp2.yaml: MoLFAdamW is built on
    plain parameters and accelerate's ``prepare`` swaps DTensors into its group."""
    out = root / "accelerate_fsdp2"
    worker = launch.WORKERS / "accelerate_fsdp_cpu.py"  # the example, on CPU ranks
    result = _accelerate("accelerate_fsdp2.yaml", worker, *loop_args, "--out", str(out))
    assert len(re.findall(r"^step \d+ loss", result.stdout, flags=re.M)) == STEPS
    counted = re.search(r"DTensor parameters: (\d+) of (\d+)", result.stdout)
    sharded, total = map(int, counted.groups())
    assert sharded == total > 0  # fully_shard ran (DDP would reach the same parameters)
    _assert_same_merged(load_file(str(out / "model.safetensors")), ds_loop, root / "base")


def test_accelerate_example_refuses_fsdp_that_accelerate_would_drop_on_cpu(root, loop_args):
    """On CPU ranks accelerate drops an FSDP plugin and would train DDP: the example says so in
    one line (the FSDP2 config's environment, as ``accelerate launch`` sets it, one process)."""
    env = {**launch.cpu_env(), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    example = launch.REPO / "examples" / "accelerate_molf.py"
    command = [sys.executable, str(example), *loop_args, "--out", str(root / "refused"), "--cpu"]
    result = launch.run_group(command, env, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("launch with `accelerate launch")
    assert not (root / "refused").exists()


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


def test_trainer_refuses_fsdp1_in_one_line(root, tmp_path):
    """FSDP1 flattens a block's parameters into one FlatParameter cut across modules and
    experts: the mixin refuses it before anything is built (on any device)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from molf_ds.errors import MoLFConfigError
    from molf_ds.hf import MoLFTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             fsdp=True, fsdp_config={"fsdp_version": 1})  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    with pytest.raises(MoLFConfigError, match="^MoLF runs under FSDP2 only: set fsdp_config=") as e:
        MoLFTrainer(model=model, args=args, molf_config=MoLFConfig(lora_ranks=(4,)))
    assert "\n" not in str(e.value)

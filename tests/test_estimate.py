"""`molf_ds.memory` and `molf-estimate` (`molf_ds.train.estimate`): parameter counts and LoRA
targets against real `transformers` models wrapped by `molf_ds.wrap`, the byte model against a
measured `MoLFAdamW` state and DeepSpeed's own estimator formulas, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import molf_ds
from molf_ds.config import MoLFConfig
from molf_ds.errors import MoLFConfigError, NoMatchingModulesError
from molf_ds.memory import (
    MEMORY_METHODS,
    EstimateError,
    count_parameters,
    estimate_memory,
    model_spec,
    optimizer_state_bytes_per_rank,
)
from molf_ds.model import molf_layers, wrap
from molf_ds.optimizer import MoLFAdamW
from molf_ds.presets import PUBLISHED
from molf_ds.train.estimate import main

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
}
# Phi-3's default pad token (32000) lies outside a tiny vocabulary: nn.Embedding rejects it.
PHI3_TOKENS = {"pad_token_id": 0, "eos_token_id": 1}
# Tiny versions of several architectures, with the options that change parameter counts. Phi-3
# fuses q/k/v and gate/up into one linear each; Mixtral's experts are fused 3-D tensors (no
# nn.Linear) behind a router.
TINY_CONFIGS = {
    "qwen2-tied": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {"num_key_value_heads": 1}),
    "llama-biases-head-dim": (
        "llama",
        {"num_key_value_heads": 2, "head_dim": 24, "attention_bias": True, "mlp_bias": True},
    ),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"num_key_value_heads": 2}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma": ("gemma", {"num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": ("gemma2", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma3-text": ("gemma3_text", {"num_key_value_heads": 1, "head_dim": 32}),
    "gemma3-text-untied-bias": (
        "gemma3_text",
        {"num_key_value_heads": 2, "tie_word_embeddings": False, "attention_bias": True},
    ),
    "phi3": ("phi3", {"num_key_value_heads": 2, **PHI3_TOKENS}),
    "mixtral": ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4}),
}


def _hf_config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _real_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parameter_tensors_match_transformers_exactly(name, tmp_path):
    model_type, extra = TINY_CONFIGS[name]
    config = _hf_config(model_type, **TINY, **extra)
    real = _real_model(config)  # built normally, on the CPU
    expected = _shapes(real)
    assert model_spec(config).shapes() == expected  # a PretrainedConfig
    assert model_spec(config.to_dict()).shapes() == expected  # a dict
    # save_pretrained leaves out values equal to the class defaults: they must come back as
    # transformers fills them in (tied embeddings, head_dim, biases).
    config.save_pretrained(tmp_path)
    assert model_spec(tmp_path).shapes() == expected  # a folder
    assert model_spec(str(tmp_path / "config.json")).shapes() == expected  # a file
    assert count_parameters(config) == sum(p.numel() for p in real.parameters())
    assert model_spec(config).architecture == type(real).__name__


@pytest.mark.parametrize(
    "model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "phi3", "mixtral"]
)
def test_family_defaults_match_transformers(model_type):
    # Only a few keys: tie_word_embeddings, head_dim, biases all from the class defaults.
    fields = dict(TINY, num_key_value_heads=2, **(PHI3_TOKENS if model_type == "phi3" else {}))
    expected = _shapes(_meta_model(_hf_config(model_type, **fields)))
    assert model_spec({"model_type": model_type, **fields}).shapes() == expected


# (method, ranks wrapped, train_base): what each method's model is; fft is not wrapped.
_WRAPS = (("fft", None, True), ("lora", (4,), False), ("molf", (4, 8), True),
          ("molf-efficient", (4, 8), False))  # fmt: skip


@pytest.mark.parametrize("name", ["qwen2-tied", "gemma3-text", "phi3", "mixtral"])
def test_trainable_counts_match_wrap_on_the_real_model(name):
    model_type, extra = TINY_CONFIGS[name]
    config = _hf_config(model_type, **TINY, **extra)
    est = estimate_memory(config, lora_ranks=(4, 8), weight_dtype="fp32")
    for method, ranks, train_base in _WRAPS:
        model = _real_model(config)
        if ranks is not None:
            wrap(model, MoLFConfig(lora_ranks=ranks, train_base=train_base))
            assert est.lora_modules == len(list(molf_layers(model))), method
        row = est.row(method, 0)
        assert row.total_params == sum(p.numel() for p in model.parameters()), method
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert row.trainable_params == trainable, method
        assert row.gpu_weight_bytes == 4 * row.total_params
    # Which layers the default targets reach, per layer: Phi-3's fused projections are
    # qkv_proj / gate_up_proj (not targeted); Mixtral's experts are no nn.Linear.
    per_layer = {"qwen2-tied": 7, "gemma3-text": 7, "phi3": 2, "mixtral": 4}[name]
    assert est.lora_modules == per_layer * TINY["num_hidden_layers"]


def test_targets_follow_wrap_for_custom_patterns():
    config = _hf_config("mixtral", **TINY, **TINY_CONFIGS["mixtral"][1])
    # Mixtral's router and experts are modules, but no nn.Linear: wrap finds nothing.
    for targets in (("experts",), ("gate",), r".*\.mlp\..*"):
        with pytest.raises(NoMatchingModulesError):
            wrap(_real_model(config), MoLFConfig(target_modules=targets))
        with pytest.raises(NoMatchingModulesError):
            estimate_memory(config, target_modules=targets)
    targets, excluded = r".*layers\.1\..*_proj", ("v_proj",)
    model = wrap(_real_model(config), MoLFConfig(target_modules=targets, exclude_modules=excluded))
    est = estimate_memory(config, target_modules=targets, exclude_modules=excluded)
    assert est.lora_modules == len(list(molf_layers(model))) == 3


def test_presets_match_transformers_and_published_sizes():
    published = {
        "qwen2.5-0.5b": 494_032_768,
        "qwen2.5-3b": 3_085_938_688,
        "llama-70b": 70_553_706_496,
    }
    assert set(PUBLISHED) == set(published)
    for preset, size in published.items():
        fields = PUBLISHED[preset].config_fields()
        model_type = fields.pop("model_type")
        fields.pop("architectures")
        model = _meta_model(_hf_config(model_type, **fields))
        assert model_spec(preset).shapes() == _shapes(model), preset
        assert count_parameters(preset) == size


def _tiny_qwen2():
    from transformers import AutoModelForCausalLM

    config = _hf_config(
        "qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    return config, AutoModelForCausalLM.from_config(config)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


@pytest.mark.parametrize(
    ("method", "ranks", "train_base"),
    [("molf", (4,), True), ("molf-efficient", (2, 6), False), ("lora", (4, 8), False)],
)
def test_measured_optimizer_state_matches_estimate(method, ranks, train_base):
    config, model = _tiny_qwen2()
    # `lora` is PEFT LoRA of the first rank: the same parameters as one frozen-base expert.
    wrapped_ranks = ranks[:1] if method == "lora" else ranks
    wrap(model, MoLFConfig(lora_ranks=wrapped_ranks, train_base=train_base))
    optimizer = MoLFAdamW(model, lr=1e-3, top_k=1)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    row = estimate_memory(config, lora_ranks=ranks, weight_dtype="fp32").row(method, 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.trainable_params == trainable
    assert row.total_params == sum(p.numel() for p in model.parameters())
    assert row.gpu_weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    measured = _state_bytes(optimizer)  # world 1, fp32: two fp32 moments per trainable param
    assert measured == 8 * trainable
    assert row.gpu_optimizer_bytes == measured
    assert optimizer_state_bytes_per_rank(trainable, 1, master_weights=False) == measured


def test_optimizer_state_bytes_per_rank():
    assert optimizer_state_bytes_per_rank(1000, 1, master_weights=False) == 8000
    assert optimizer_state_bytes_per_rank(1000, 1, master_weights=True) == 12000
    assert optimizer_state_bytes_per_rank(1001, 4, master_weights=True) == 12 * 251
    with pytest.raises(EstimateError):
        optimizer_state_bytes_per_rank(10, 0)


def test_rows_follow_the_zero_byte_model():
    est = estimate_memory("qwen2.5-3b", num_gpus_per_node=8, num_nodes=2)
    world, total = 16, count_parameters("qwen2.5-3b")
    assert est.world_size == world
    assert {(r.stage, r.offload) for r in est.rows if r.method == "fft"} == {
        (0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
        (3, "none"), (3, "optimizer"), (3, "optimizer+param"),
    }  # fmt: skip
    assert [m for m in dict.fromkeys(r.method for r in est.rows)] == list(MEMORY_METHODS)
    for row in est.rows:
        parts = (row.gpu_weight_bytes, row.gpu_grad_bytes, row.gpu_optimizer_bytes)
        assert row.gpu_bytes_per_gpu == sum(parts) + row.gpu_gather_bytes
        assert (row.cpu_bytes_per_node > 0) == (row.offload != "none")
        if row.stage in (1, 2) and row.offload == "none":  # the helper the ZeRO checks use
            expected = optimizer_state_bytes_per_rank(row.trainable_params, world, True)
            assert row.gpu_optimizer_bytes == expected

    fft = {(r.stage, r.offload): r for r in est.rows if r.method == "fft"}
    assert fft[0, "none"].gpu_bytes_per_gpu == 16 * total  # 2 + 2 + 4 + 8 bytes per param
    # DeepSpeed's estimate_zero2_model_states_mem_needs(cpu_offload=True): 2 bytes/param on GPU.
    assert fft[2, "optimizer"].gpu_bytes_per_gpu == 2 * total
    # estimate_zero3_model_states_mem_needs(offload optimizer + params, zero_init, buffer 1):
    # 18 bytes per param per node; 4 x the largest layer on the GPU.
    assert fft[3, "optimizer+param"].cpu_bytes_per_node == pytest.approx(18 * total / 2, rel=1e-3)
    assert fft[3, "optimizer"].cpu_bytes_per_node == pytest.approx(16 * total / 2, rel=1e-3)
    assert fft[3, "none"].gpu_gather_bytes == 4 * 151936 * 2048  # the embedding
    # More sharding never needs more GPU memory here.
    gpu = [fft[s, "none"].gpu_bytes_per_gpu for s in (0, 1, 2, 3)]
    assert gpu == sorted(gpu, reverse=True)

    molf, lora = est.row("molf", 0), est.row("lora", 0)
    assert molf.trainable_params == total + lora.trainable_params
    assert lora.trainable_params == 36 * 64 * (  # r x (in + out) of the 7 projections
        (2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 2 + (11008 + 2048)
    )


def test_lora_factors_stay_resident_under_zero3():
    est = estimate_memory("qwen2.5-0.5b", num_gpus_per_node=8, num_nodes=64, lora_ranks=(8, 64))
    lora_numel = est.row("molf-efficient", 0).trainable_params
    for method in ("molf", "molf-efficient"):
        for offload in ("none", "optimizer", "optimizer+param"):
            row = est.row(method, 3, offload)
            assert row.gpu_weight_bytes >= 2 * lora_numel  # never sharded
    # ... while their optimizer states are sharded like everything else.
    assert est.row("molf-efficient", 3).gpu_optimizer_bytes < 12 * lora_numel / 500
    # Plain DeepSpeed (threshold 1e5) partitions the rank-64 factors of the MLP (311296 elements).
    plain = estimate_memory("qwen2.5-0.5b", num_nodes=64, lora_ranks=(64,), methods=("lora",))
    lora64 = plain.row("lora", 0).trainable_params
    assert plain.row("lora", 3, "optimizer+param").gpu_weight_bytes < 2 * lora64
    pinned = estimate_memory("qwen2.5-0.5b", num_nodes=8, persistence_threshold=0)
    assert pinned.row("molf", 3, "optimizer+param").gpu_weight_bytes == 0


def test_fsdp2_rows_follow_fully_shard():
    """FSDP2 rows (measured against real ranks in tests/test_fsdp2_library.py): fp32 shards of
    every parameter as the master, fp32 gradient shards and the moments of the trainable ones;
    the root module gathered all step plus two decoder layers and one layer's gradients, or
    everything with reshard_after_forward=False; CPUOffloadPolicy leaves only the gathers."""
    est = estimate_memory("qwen2.5-0.5b", num_gpus_per_node=8, engine="fsdp2", lora_ranks=(8,))
    assert est.engine == "fsdp2" and est.to_dict()["engine"] == "fsdp2"
    assert {(r.stage, r.offload) for r in est.rows if r.method == "molf"} == {
        (3, "none"), (3, "optimizer+param"), (2, "none"), (2, "optimizer+param"),
    }  # fmt: skip
    spec = model_spec("qwen2.5-0.5b")
    assert spec.blocks == tuple(f"model.layers.{i}" for i in range(24))
    total = spec.num_params  # 896 x 151936 embedding tied with the head; 24 layers of equal size
    layer = sum(p.numel for p in spec.params if p.module.startswith("model.layers.0."))
    root = total - 24 * layer
    fft = est.row("fft", 3)
    assert fft.gpu_weight_bytes == pytest.approx(4 * total / 8, rel=1e-3)  # no other master
    assert fft.gpu_grad_bytes == fft.gpu_weight_bytes
    assert fft.gpu_optimizer_bytes == 2 * fft.gpu_weight_bytes
    # bf16 compute: the root (embedding and final norm) + 2 layers, + the root's gradients
    assert fft.gpu_gather_bytes == 2 * (root + 2 * layer + root)
    assert est.row("fft", 2).gpu_gather_bytes == 2 * (total + root)
    offloaded = est.row("fft", 3, "optimizer+param")
    assert offloaded.gpu_bytes_per_gpu == fft.gpu_gather_bytes
    assert offloaded.cpu_bytes_per_node == 8 * (fft.gpu_bytes_per_gpu - fft.gpu_gather_bytes)
    efficient = est.row("molf-efficient", 3)
    assert efficient.gpu_weight_bytes > fft.gpu_weight_bytes  # frozen base sharded, + LoRA
    assert efficient.gpu_optimizer_bytes == 2 * efficient.gpu_grad_bytes
    with pytest.raises(EstimateError, match="`engine` must be one of deepspeed, fsdp2"):
        estimate_memory("qwen2.5-0.5b", engine="fsdp")


def test_cli_fsdp2_table(capsys):
    assert main(["--preset", "qwen2.5-0.5b", "--engine", "fsdp2", "--methods", "molf"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2" in out and "fp32 sharded weights, bf16 compute" in out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split()[:3] == ["method", "reshard", "offload"]
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith("molf ")]
    assert rows == [["molf", "no", "none"], ["molf", "no", "optimizer+param"],
                    ["molf", "yes", "none"], ["molf", "yes", "optimizer+param"]]  # fmt: skip


def test_fp32_master_copy_rules():
    est = estimate_memory("qwen2.5-0.5b", weight_dtype="fp32", num_gpus_per_node=2)
    trainable = est.row("fft", 0).trainable_params
    assert est.row("fft", 0).gpu_optimizer_bytes == 8 * trainable  # steps the weights
    assert est.row("fft", 1).gpu_optimizer_bytes == 12 * -(-trainable // 2)  # cloned partition
    bf16 = estimate_memory("qwen2.5-0.5b")
    assert bf16.row("fft", 0).gpu_optimizer_bytes == 12 * trainable


def test_bad_inputs_raise_named_errors(tmp_path):
    with pytest.raises(EstimateError, match="neither a preset"):
        estimate_memory("no-such-model")
    with pytest.raises(EstimateError, match="neither a preset"):
        estimate_memory(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EstimateError, match="cannot read config"):
        estimate_memory(tmp_path / "bad.json")
    with pytest.raises(EstimateError, match="unsupported model_type 'clip'"):
        estimate_memory({"model_type": "clip"})  # known to transformers, but no causal LM
    with pytest.raises(EstimateError, match="'no-such-arch' is unknown to transformers"):
        estimate_memory({"model_type": "no-such-arch", **TINY})
    with pytest.raises(EstimateError, match="invalid config: .*not a multiple") as err:
        estimate_memory({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4})
    assert "\n" not in str(err.value)  # the CLI prints errors on one line
    with pytest.raises(EstimateError, match="num_nodes"):
        estimate_memory("qwen2.5-3b", num_nodes=0)
    with pytest.raises(EstimateError, match="weight_dtype"):
        estimate_memory("qwen2.5-3b", weight_dtype="int8")
    with pytest.raises(MoLFConfigError, match="lora_ranks"):
        estimate_memory("qwen2.5-3b", lora_ranks=(0,))
    with pytest.raises(NoMatchingModulesError):
        estimate_memory("qwen2.5-3b", target_modules=("nope",))
    # fft needs no LoRA target.
    assert estimate_memory("qwen2.5-3b", target_modules=("nope",), methods=("fft",)).rows


@pytest.fixture(scope="module")
def cli_runs():
    """The subprocess checks, started together (each pays Python + torch start-up)."""
    lazy = "import sys, molf_ds; print(sorted({'deepspeed', 'transformers'} & set(sys.modules)))"
    commands = {
        "table": ["-m", "molf_ds.train.estimate", "--preset", "qwen2.5-3b", "--gpus-per-node", "8",
                  "--nodes", "2"],
        "missing": ["-m", "molf_ds.train.estimate", "--config", "/no/such/config.json"],
        "unknown": ["-m", "molf_ds.train.estimate", "--preset", "gpt-17"],
        "lazy": ["-c", lazy],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


@pytest.mark.slow
def test_exported_and_lazy(cli_runs):
    assert molf_ds.estimate_memory is estimate_memory
    assert "estimate_memory" in molf_ds.__all__
    out = cli_runs["lazy"]
    assert out.stdout.strip() == "[]", out.stderr  # `import molf_ds` loads neither


@pytest.mark.slow
def test_cli_table(cli_runs):
    out = cli_runs["table"]
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "2 nodes x 8 GPUs per node = 16 data-parallel ranks" in out.stdout
    for method in MEMORY_METHODS:
        assert f"\n{method} " in out.stdout
    assert "optimizer+param" in out.stdout


def _assert_one_line_error(returncode: int, stdout: str, stderr: str, message: str) -> None:
    assert returncode != 0
    assert stdout == ""
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("molf-estimate: error:") and message in stderr, stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "message"),
    [("missing", "neither a preset"), ("unknown", "invalid choice: 'gpt-17'")],
)
def test_cli_bad_input_subprocess(cli_runs, run, message):
    out = cli_runs[run]
    _assert_one_line_error(out.returncode, out.stdout, out.stderr, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "qwen2.5-3b", "--lora-ranks", "0"], "lora_ranks"),
        (["--preset", "qwen2.5-3b", "--nodes", "0"], "num_nodes"),
        (["--preset", "qwen2.5-3b", "--stages", "4"], "invalid choice: 4"),
        (["--preset", "qwen2.5-3b", "--engine", "fsdp2", "--stages", "1"], "under fsdp2"),
        (["--preset", "qwen2.5-3b", "--engine", "fsdp1"], "invalid choice: 'fsdp1'"),
        ([], "one of the arguments --preset --config is required"),
    ],
)
def test_cli_bad_input_in_process(capsys, args, message):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    _assert_one_line_error(code, out.out, out.err, message)


def test_cli_json_and_help(capsys):
    assert main(["--preset", "llama-70b", "--nodes", "4", "--gpus-per-node", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 32 and data["base_params"] == 70_553_706_496
    assert data["rows"][0] == dict(
        data["rows"][0], method="fft", stage=0, offload="none", trainable_params=70_553_706_496
    )
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    options = [
        "--preset", "--config", "--gpus-per-node", "--nodes", "--lora-ranks", "--target-modules",
        "--target-regex", "--exclude-modules", "--weight-dtype", "--methods", "--engine",
        "--stages", "--persistence-threshold", "--json",
    ]  # fmt: skip
    for option in options:
        assert option in help_text
    assert help_text.count("(default:") == len(options)

"""`molf_ds.train.config`: file + ``key=value`` parsing, strict types, ranges, one-line errors,
``--help``, in process (the job itself is exercised by test_train.py)."""

from __future__ import annotations

import json

import pydantic
import pytest

from molf_ds.errors import MoLFConfigError
from molf_ds.train.config import TrainConfig, load_config, parse_args


class _Probe(TrainConfig):
    """TrainConfig plus an ``int | None`` option, as a future one would be declared."""

    eval_every: int | None = pydantic.Field(None, ge=1, description="probe")


def test_defaults_validate_and_are_frozen() -> None:
    config = load_config(None, [])
    assert config == TrainConfig()
    assert config.mode == "molf" and config.lora_ranks == (16,) and config.lora_lr is None
    with pytest.raises(pydantic.ValidationError):
        config.max_steps = 3


def test_every_field_type_from_a_dotlist() -> None:
    config = load_config(
        None,
        [
            "output_dir=runs/x",  # str
            "overwrite=true",  # bool
            "max_steps=7",  # int
            "lr=1e-4",  # float, written as JSON reads it (YAML 1.1 would give a string)
            "lora_alpha=8",  # an int is a fine float
            "lora_lr=1e-3",  # float | None
            "lora_weight_decay=null",
            "mode=molf-efficient",  # Literal
            "schedule=linear",
            "lora_ranks=[4, 8]",  # a list
            "top_k=2",
        ],
    )
    assert config.output_dir == "runs/x" and config.overwrite is True
    assert config.max_steps == 7 and config.lr == 1e-4 and config.lora_alpha == 8.0
    assert isinstance(config.lora_alpha, float)
    assert config.lora_lr == 1e-3 and config.lora_weight_decay is None
    assert config.mode == "molf-efficient" and config.schedule == "linear"
    assert config.lora_ranks == (4, 8)
    assert load_config(None, ["lora_lr=null"]).lora_lr is None


def test_an_int_or_none_field() -> None:
    assert load_config(None, [], schema=_Probe).eval_every is None
    assert load_config(None, ["eval_every=5"], schema=_Probe).eval_every == 5
    assert load_config(None, ["eval_every=null"], schema=_Probe).eval_every is None
    with pytest.raises(MoLFConfigError, match=r"`eval_every` must be int or null, got 'x'"):
        load_config(None, ["eval_every=x"], schema=_Probe)
    with pytest.raises(MoLFConfigError, match=r"`eval_every` must be >= 1, got 0"):
        load_config(None, ["eval_every=0"], schema=_Probe)


def test_command_line_conveniences() -> None:
    assert load_config(None, ["lora_ranks=8"]).lora_ranks == (8,)
    assert load_config(None, ["model=123"]).model == "123"  # a directory named 123
    assert load_config(None, ["lr=.5"]).lr == 0.5  # YAML reads what JSON does not
    assert load_config(None, ["data=a=b.jsonl"]).data == "a=b.jsonl"  # first '=' splits


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=1e-3"], "unknown config key `lrr`; did you mean `lr`?"),
        (["zzz=1"], "unknown config key `zzz`"),
        (["lr=fast"], "`lr` must be float, got 'fast'"),
        (["lora_lr=fast"], "`lora_lr` must be float or null, got 'fast'"),
        (["max_steps=true"], "`max_steps` must be int, got True"),  # a bool is no int
        (["max_steps=2.0"], "`max_steps` must be int, got 2.0"),
        (["lr=true"], "`lr` must be float, got True"),
        (["overwrite=1"], "`overwrite` must be bool (true or false), got 1"),
        (["max_steps=0"], "`max_steps` must be >= 1, got 0"),
        (["max_bad_steps=0"], "`max_bad_steps` must be >= 1, got 0"),
        (["save_every=-1"], "`save_every` must be >= 0, got -1"),
        (["eval_fraction=1.0"], "`eval_fraction` must be < 1.0, got 1.0"),
        (["mode=sgd"], "unknown `mode` 'sgd': choose one of 'fft', 'lora'"),
        (["schedule=step"], "unknown `schedule` 'step'"),
        (["score=x"], "unknown `score` 'x'"),
        (["lora_ranks=[]"], "`lora_ranks` must hold at least 1 item(s), got []"),
        (["lora_ranks=[4, 0]"], "`lora_ranks` item 1 must be > 0, got 0"),
        (["lora_ranks=[4, true]"], "`lora_ranks` item 1 must be int, got True"),
        (["top_k=3"], "`top_k`=3 is larger than the 2 experts of mode 'molf'"),
        (["mode=molf-efficient", "top_k=2"], "larger than the 1 experts"),
        (["resume=/no/such/checkpoint"], "`resume` checkpoint not found: '/no/such/checkpoint'"),
        (["lr"], "override 'lr' is not key=value"),
        (["lr=x", "max_steps=0"], "`lr` must be float, got 'x' (and 1 more wrong key)"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message) -> None:
    with pytest.raises(MoLFConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_top_k_is_free_outside_the_routed_modes() -> None:
    assert load_config(None, ["mode=lora", "top_k=3"]).top_k == 3


def test_file_then_overrides(tmp_path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: 9\nlr: 1.0e-4\nmode: fft\n")
    config = load_config(str(yaml_file), ["max_steps=3"])
    assert (config.max_steps, config.lr, config.mode) == (3, 1e-4, "fft")
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps(config.to_dict()))  # run_config.json reads back
    assert load_config(str(json_file), []) == config
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml"), []) == TrainConfig()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.yaml", None, "config file not found"),
        ("bad.json", "{", "cannot parse config file"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("typo.yaml", "max_step: 3\n", "did you mean `max_steps`?"),
    ],
)
def test_bad_config_files(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(MoLFConfigError, match=message):
        load_config(str(path), [])


def test_parse_args_ignores_the_launchers_local_rank_and_mixes_flags(tmp_path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 9\nseed: 4\n")
    argv = ["--local_rank=1", "max_steps=3", "--config", str(config_file), "lr=1e-4"]
    config = parse_args(argv)
    assert (config.max_steps, config.seed, config.lr) == (3, 4, 1e-4)
    assert parse_args(["--local-rank", "0"]) == TrainConfig()


def test_parse_args_bad_config_exits_2_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["lrr=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "molf-train: error: unknown config key `lrr`; did you mean `lr`?\n"


def test_parse_args_unknown_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--lr", "1"])
    assert info.value.code == 2
    assert "molf-train: error: unrecognized arguments: --lr" in capsys.readouterr().err


def test_help_lists_every_option_with_default_and_meaning(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: molf-train [--config FILE] [key=value ...]" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name, field in TrainConfig.model_fields.items():
        assert name in lines, name
        default = field.default
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        assert shown in lines[name] and field.description in lines[name], name
    assert "local_rank" not in out


@pytest.mark.parametrize(
    ("option", "in_ds_config", "expected"),
    [
        (None, "auto", False),  # CPU ranks: fp32
        (None, True, True),  # the DeepSpeed config decides when the option is null
        (None, False, False),
        (True, "auto", True),  # an explicit option wins (fill_auto refuses a disagreeing file)
        (False, "auto", False),
    ],
)
def test_bf16_null_follows_the_ranks_device_or_the_ds_config(
    tmp_path, monkeypatch, option, in_ds_config, expected
) -> None:
    from molf_ds.train.engines import ENGINES, _deepspeed_bf16

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # CPU ranks, whatever this machine has
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"bf16": {"enabled": in_ds_config}}))
    config = load_config(None, [f"bf16={json.dumps(option)}"])
    assert config.bf16 is option
    assert _deepspeed_bf16(config, ds_path) is expected
    # FSDP2 has no config of its own: null follows the device alone
    fsdp2 = load_config(None, ["engine=fsdp2", f"bf16={json.dumps(option)}"])
    assert ENGINES["fsdp2"].settings(fsdp2, 1, 2).bf16 is bool(option)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine=fsdp2", "ds_config=zero3"], "`ds_config` is an option of engine=deepspeed only"),
        (["engine=fsdp2", "ds_config=zero2"], "`ds_config` is an option of engine=deepspeed"),
        (["engine=fsdp2", "zero_init=false"], "`zero_init` is an option of engine=deepspeed"),
        (["fsdp_offload=true"], "`fsdp_offload` is an option of engine=fsdp2 only"),
        (
            ["engine=deepspeed", "fsdp_reshard_after_forward=false"],
            "`fsdp_reshard_after_forward` is an option of engine=fsdp2 only, but this run has "
            "engine=deepspeed: remove it, or set engine=fsdp2",
        ),
        (["engine=torch"], "unknown `engine` 'torch': choose one of 'deepspeed' or 'fsdp2'"),
    ],
)
def test_options_of_the_other_engine_are_one_line_errors(overrides, message, capsys) -> None:
    """Refused before any rank starts, as molf-train's other option errors: exit 2, one line."""
    with pytest.raises(SystemExit) as info:
        parse_args(overrides)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("molf-train: error: ") and message in err, err


def test_each_engine_takes_its_own_options_and_reads_back(tmp_path) -> None:
    """bf16 and gradient_checkpointing belong to both engines; run_config.json leaves out the
    other engine's options (their defaults), so that it reads back as the same config."""
    fsdp2 = load_config(
        None,
        [
            "engine=fsdp2",
            "fsdp_offload=true",
            "fsdp_reshard_after_forward=false",
            "bf16=true",
            "gradient_checkpointing=true",
        ],
    )
    deepspeed = load_config(None, ["ds_config=zero3", "zero_init=false", "bf16=true"])
    for config, absent in ((fsdp2, ("ds_config", "zero_init")), (deepspeed, ("fsdp_offload",))):
        written = config.to_dict()
        assert not set(absent) & set(written)
        path = tmp_path / f"{config.engine}.json"
        path.write_text(json.dumps(written))
        assert load_config(str(path), []) == config

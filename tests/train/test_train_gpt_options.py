"""`selfhost train gpt`'s settings have one home each: TrainConfig's fields, the flags options.py names
(the CLI declares them, errors quote them), the choices of its Literal types, and the shipped presets
(TOML files read like --config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import typer

pytest.importorskip("torch")

from selfhost.cli import train_gpt  # noqa: E402
from selfhost.cli.app import app  # noqa: E402
from selfhost.errors import NotFoundError, UsageError  # noqa: E402
from selfhost.models.kinds import Kind  # noqa: E402
from selfhost.train.gpt import options  # noqa: E402
from selfhost.train.gpt.config import TrainConfig, build_config, read_toml  # noqa: E402
from selfhost.train.gpt.resume import resume_config  # noqa: E402

# The shipped presets' settings (what config.PRESETS held before the presets became TOML files, but for
# lr_decay_iters: the decay now follows --iters; cpu-tiny's zero-initialized projections live in the model).
SHIPPED_PRESETS = {
    "seed": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64, max_iters=5000,
                 learning_rate=0.0003, decay_lr=False, warmup_iters=0, min_lr=0.0003, beta2=0.999,
                 weight_decay=0.01, grad_clip=0.0, eval_interval=500, eval_iters=200, log_interval=10),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                             max_iters=5000, learning_rate=0.001, min_lr=0.0001,
                             warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                             eval_iters=200, log_interval=10),
    "nanogpt-cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12,
                             max_iters=2000, learning_rate=0.001, min_lr=0.0001,
                             warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                             eval_iters=20, log_interval=10, sample_tokens=100),
    "cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12,
                     max_iters=1000, learning_rate=0.001, min_lr=0.0001,
                     warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=200,
                     eval_iters=20, log_interval=10, sample_tokens=100, arch="llama", optimizer="muon",
                     lr_schedule="wsd", cooldown=0.4),
    "finetune": dict(block_size=512, dropout=0.0, batch_size=8, max_iters=100, learning_rate=0.001,
                     min_lr=0.0001, warmup_iters=5, lr_schedule="wsd", cooldown=0.3, weight_decay=0.0,
                     grad_clip=1.0, lora_rank=8, lora_alpha=16.0, log_interval=1),
}  # fmt: skip
# The choice flags of `train gpt` and the core Literal each one offers.
CHOICES = {"--device": options.Device, "--dtype": options.DType, "--tokenizer": options.TokenizerKind,
           "--arch": options.Arch, "--optimizer": options.OptimizerKind, "--lr-schedule": options.Schedule,
           "--export-type": options.ExportType}  # fmt: skip


def train_gpt_command() -> Any:
    group = typer.main.get_command(app)
    return group.commands["train"].commands["gpt"]  # type: ignore[attr-defined]


def one_error_line(result) -> str:  # noqa: ANN001
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- presets ------------------------------------------------------------------------------------------
def test_presets_are_the_shipped_toml_files() -> None:
    assert options.preset_names() == sorted(SHIPPED_PRESETS)
    for name, values in SHIPPED_PRESETS.items():
        assert build_config(name) == TrainConfig(**values), name
    assert build_config() == build_config(options.DEFAULT_PRESET)
    # cpu-tiny builds on nanogpt-cpu-tiny (`preset = ...`), read like any --config file
    assert read_toml(options.PRESETS_DIR / "cpu-tiny.toml")["preset"] == "nanogpt-cpu-tiny"


def test_the_decay_follows_iters_so_a_shorter_run_still_cools_down() -> None:
    assert build_config("cpu-tiny").decay_iters == 1000
    assert build_config("cpu-tiny", overrides={"max_iters": 500}).decay_iters == 500
    assert build_config("cpu-tiny", overrides={"max_iters": 500, "lr_decay_iters": 800}).decay_iters == 800


def test_a_config_file_builds_on_a_preset_chain_and_flags_beat_both(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "cpu-tiny"\nmax-iters = 300\n', "utf-8")
    cfg = build_config(config_file=toml, overrides={"learning_rate": 2e-3})
    assert (cfg.arch, cfg.optimizer, cfg.n_embd, cfg.eval_iters) == ("llama", "muon", 128, 20)  # both layers
    assert (cfg.max_iters, cfg.learning_rate) == (300, 2e-3)
    assert build_config("seed", toml).arch == "gpt2"  # --preset picks the base over the file's `preset`


def test_preset_chains_end_and_cycles_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "PRESETS_DIR", tmp_path)
    (tmp_path / "a.toml").write_text('preset = "b"\nn_layer = 2\n', "utf-8")
    (tmp_path / "b.toml").write_text('preset = "c"\nn_layer = 3\nn_head = 2\n', "utf-8")
    (tmp_path / "c.toml").write_text("n_embd = 64\n", "utf-8")
    cfg = build_config("a")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (2, 2, 64)
    (tmp_path / "c.toml").write_text('preset = "a"\n', "utf-8")
    with pytest.raises(UsageError, match="in a circle: a -> b -> c -> a"):
        build_config("a")
    (tmp_path / "c.toml").write_text('preset = "c"\n', "utf-8")
    with pytest.raises(UsageError, match="in a circle: c -> c"):
        build_config("c")
    (tmp_path / "c.toml").write_text('preset = "gone"\n', "utf-8")
    with pytest.raises(NotFoundError, match="unknown preset 'gone'.*choose one of: a, b, c"):
        build_config("a")


def test_unknown_preset_lists_the_shipped_ones(runner) -> None:  # noqa: ANN001
    line = one_error_line(runner.invoke(app, ["train", "gpt", "--preset", "huge"]))
    assert f"choose one of: {', '.join(options.preset_names())}" in line
    (preset,) = [p for p in train_gpt_command().params if p.name == "preset"]
    assert f"Base settings: {', '.join(options.preset_names())} (default: cpu-tiny" in preset.help


# -- one flag per setting -----------------------------------------------------------------------------
def test_every_setting_has_its_flag_and_every_flag_a_setting() -> None:
    fields = set(TrainConfig.model_fields)
    assert options.NO_FLAG <= fields and set(options.ALIASES) <= fields and set(options.OFF_FLAGS) <= fields
    assert all(TrainConfig.model_fields[f].annotation is bool for f in options.OFF_FLAGS)
    settings = {}
    for param in train_gpt_command().params:
        if param.name in train_gpt.RUN_OPTIONS:
            assert param.name not in fields, param.name  # a run option never shadows a setting
            continue
        assert param.name in fields, f"{param.opts} is neither a setting nor one of RUN_OPTIONS"
        settings[param.name] = (param.opts, getattr(param, "secondary_opts", []))
    assert set(settings) == fields - options.NO_FLAG
    for field, (opts, off) in settings.items():
        assert opts == [options.flag(field)], field
        assert off == ([options.OFF_FLAGS[field]] if field in options.OFF_FLAGS else []), field
    assert options.flag("max_iters") == "--iters" and options.flag("learning_rate") == "--lr"
    assert options.flag("warmup_iters") == "--warmup" and options.flag("n_kv_head") == "--n-kv-head"


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--iters", "0"], "--iters"), (["--lr", "-1.0"], "--lr"), (["--warmup", "-1"], "--warmup"),
     (["--n-layer", "0"], "--n-layer"), (["--val-fraction", "1.5"], "--val-fraction")],
)  # fmt: skip
def test_an_out_of_range_flag_is_one_line_naming_that_flag(runner, args: list[str], flag: str) -> None:  # noqa: ANN001
    line = one_error_line(runner.invoke(app, ["train", "gpt", "--estimate", *args]))
    assert line.startswith(f"error: invalid {flag}: ") and f"(got {args[1]})" in line, line


def test_a_config_file_error_names_its_key(runner, tmp_path: Path) -> None:  # noqa: ANN001
    toml = tmp_path / "run.toml"
    toml.write_text("max-iters = 0\n", "utf-8")
    line = one_error_line(runner.invoke(app, ["train", "gpt", "--config", str(toml)]))
    assert line.startswith(f"error: invalid max-iters in {toml}: ") and "--" not in line
    toml.write_text("n_layers = 3\n", "utf-8")
    line = one_error_line(runner.invoke(app, ["train", "gpt", "--config", str(toml)]))
    assert line == f"error: unknown training setting n_layers in {toml}"
    toml.write_text("max_iters = 0\n", "utf-8")  # a flag beats the file: no error
    assert build_config(config_file=toml, overrides={"max_iters": 5}).max_iters == 5


# -- --resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--preset", "seed"], ["--config", "run.toml"]])
def test_resume_refuses_a_preset_or_config_file(runner, extra: list[str]) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["train", "gpt", "--resume", "--name", "none", *extra])
    line = one_error_line(result)
    assert result.exit_code == 2 and "--resume continues a run with its own settings" in line


def test_resume_takes_the_checkpoints_settings_and_extending_flags() -> None:
    saved = build_config("cpu-tiny").model_dump(mode="json")
    assert resume_config(saved, {"max_iters": 2000, "device": "cpu"}).max_iters == 2000
    with pytest.raises(UsageError, match=r"^--lr 0\.1 differs from the checkpoint's 0\.001"):
        resume_config(saved, {"learning_rate": 0.1})
    assert resume_config(saved, {"learning_rate": 0.001}).learning_rate == 0.001  # the same value is fine


# -- choices ------------------------------------------------------------------------------------------
def choice_error(result, flag: str, choices: tuple) -> None:  # noqa: ANN001
    """A value outside the choices: exit 2 while parsing, one error line naming the flag and each choice."""
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"'{flag}'" in errors[0] and ", ".join(f"'{c}'" for c in choices) in errors[0], errors[0]


@pytest.mark.parametrize("flag", sorted(CHOICES))
def test_choices_are_the_cores_literals(runner, flag: str) -> None:  # noqa: ANN001
    choices = get_args(CHOICES[flag])
    help_text = runner.invoke(app, ["train", "gpt", "--help"]).output
    assert f"{flag} <{'|'.join(choices)}>" in help_text
    choice_error(runner.invoke(app, ["train", "gpt", flag, "nope"]), flag, choices)


def test_export_type_and_kind_choices(runner) -> None:  # noqa: ANN001
    export = runner.invoke(app, ["gpt", "export", "run", "--type", "q4_0"])
    choice_error(export, "--type", get_args(options.ExportType))
    kind = runner.invoke(app, ["models", "list", "--available", "--kind", "vision"])
    choice_error(kind, "--kind", get_args(Kind))
    assert "<chat|embedding|base|rerank>" in runner.invoke(app, ["models", "list", "--help"]).output

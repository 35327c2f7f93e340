"""The sectioned run configuration and the command line generated from it (issue 10).

What is checked: every option of every command has a description; the train flags show
type, default and allowed values; no prefix matching (``--ep 2`` is not ``--eps``);
mistyped flags and run-file keys are one-line errors with a "did you mean"; sectioned,
flat and dotted run files (YAML and TOML) give the same configuration; a run directory
written before the sections existed still resumes; ``--print-config`` writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from typing import get_args

import pytest
import yaml
from helpers import assert_one_error, cli, quick_options, read_jsonl

from dsv3.cli import COMMANDS, build_parser, main
from dsv3.cli.options import overrides_from_args
from dsv3.errors import ConfigError
from dsv3.layout import RecomputeMode
from dsv3.train.config import (
    TrainConfig,
    load_train_config,
    options,
)
from dsv3.utils.size import parse_size


# ----------------------------------------------------------------------------- help
def _parsers(parser: argparse.ArgumentParser, name: str = "dsv3"):
    """(name, parser) of the top-level parser and every sub-command, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_every_listed_command_exists_and_convert_is_gone():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    assert "convert" not in COMMANDS
    assert set(COMMANDS) >= {"train", "generate", "plot", "plan", "memory"}


def test_help_of_every_command_describes_every_option():
    seen = set()
    for name, parser in _parsers(build_parser()):
        seen.add(name)
        text = _squash(parser.format_help())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help != argparse.SUPPRESS and len(action.help.split()) >= 2, (
                f"`{name}` option {label} has no description"
            )
            assert _squash(action.help) in text, f"`{name} --help` does not show the description of {label}"
            for flag in action.option_strings:
                assert flag in text, f"`{name} --help` does not list {flag}"
    assert {
        "dsv3 train",
        "dsv3 generate",
        "dsv3 plot",
        "dsv3 plan",
        "dsv3 memory",
        "dsv3 plan schedule",
        "dsv3 plan search",
    } <= seen


def test_train_help_shows_description_type_default_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = _squash(capsys.readouterr().out)
    for opt in options():  # every field of every section is a flag with its description
        assert "--" + opt.flat.replace("_", "-") in text, opt.flat
        assert _squash(opt.help) in text, opt.flat
    # spot checks written out by hand: type, default and allowed values
    assert "--lr FLOAT peak learning rate (float; default 0.002)" in text
    assert "--recompute {none,selective,full}" in text and "(choice; default none)" in text
    assert "--ep INT expert-parallel size (int; default 1)" in text
    assert "--dp INT" in text and "(int or none; default none)" in text
    assert "--pipeline {1f1b,zb1p,dualpipe,dualpipev}" in text
    assert "--dispatcher {auto,local,alltoall,deepep}" in text
    assert "--fp8 [BOOL], --no-fp8" in text and "(bool; default false)" in text
    assert "--sample-prompt STR prompt of the text sample printed at the end (str; default 'def ')" in text
    assert "--moe-router-bias-update-rate" in text and "--mtp-loss-scaling-factor" in text  # Megatron names
    for section in (
        "model:",
        "data:",
        "optimizer:",
        "schedule:",
        "moe:",
        "precision:",
        "memory:",
        "parallel:",
        "checkpoint:",
        "logging:",
        "run:",
    ):
        assert section in text
    assert "(default: None)" not in text  # the old help's only content


def test_readme_command_lines_still_parse():
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = re.findall(r"^dsv3 (?:train|generate|plot|plan|memory)(?: .*)?$", readme, re.M)
    assert len(lines) >= 8
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line.split("  #")[0])[1:]
        args = parser.parse_args(argv)  # an unknown or abbreviated flag would exit 2 here
        assert args.command == argv[0]
        if argv[0] == "train":
            load_train_config(None, overrides_from_args(args))  # and the values are valid


def test_literal_choices_are_spelled_once():
    recompute = next(o for o in options() if o.flat == "recompute")
    assert recompute.choices == get_args(RecomputeMode) == ("none", "selective", "full")
    with pytest.raises(ConfigError, match="none, selective, full"):
        TrainConfig.from_dict({"recompute": "sometimes"})


# ----------------------------------------------------------------------------- flags
def _overrides(*argv: str) -> dict:
    return overrides_from_args(build_parser().parse_args(["train", *argv]))


def test_ep_is_not_an_abbreviation_of_eps():
    config = load_train_config(None, _overrides("--ep", "2"))
    assert config.parallel.ep == 2 and config.optimizer.eps == 1e-8
    config = load_train_config(None, _overrides("--eps", "1e-6"))
    assert config.parallel.ep == 1 and config.optimizer.eps == 1e-6


def test_schedule_is_the_plan_spelling_of_pipeline():
    """``dsv3 train --schedule`` (the name ``dsv3 plan schedule`` uses) sets the pipeline schedule, as ``--pipeline`` does."""
    assert load_train_config(None, _overrides("--schedule", "dualpipev")).parallel.pipeline == "dualpipev"
    assert load_train_config(None, _overrides("--pipeline", "zb1p")).parallel.pipeline == "zb1p"
    assert load_train_config(None, _overrides()).parallel.pipeline == "1f1b"


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train", "--warmup", "3"], "--warmup-steps"),  # a prefix: argparse's default would have accepted it
        (["train", "--seq", "64"], "--seq-len"),
        (["train", "--eps2", "1e-6"], "--eps"),
        (["train", "--recompte", "full"], "--recompute"),
        (["train", "--log-every", "5"], None),  # retired flag: an error, not silently ignored
        (["memory", "--micro-bach", "2"], "--micro-batch"),
        (["plot", "somewhere", "--log-yy"], "--log-y"),
        (["plan", "--gpus-per-nod", "4"], "--gpus-per-node"),
        (["generate", "run", "--max-token", "5"], "--max-tokens"),
    ],
)
def test_mistyped_flag_is_a_one_line_error_with_did_you_mean(argv, hint, capsys):
    code, _, err = cli(argv, capsys)
    assert assert_one_error(code, err).startswith("dsv3: error: unrecognized arguments: "), err
    if hint is not None:
        assert f"(did you mean {hint}" in err[0] and err[0].endswith("?)"), err


def test_mistyped_command_is_reported_as_such(capsys):
    with pytest.raises(SystemExit) as info:
        main(["trian", "--lr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "invalid choice: 'trian'" in err[0] and "'train'" in err[0]


def test_booleans_take_an_optional_value():
    assert _overrides("--fp8") == {"fp8": "true"}
    assert load_train_config(None, _overrides("--fp8")).precision.fp8 is True
    assert load_train_config(None, _overrides("--fp8", "false")).precision.fp8 is False
    assert load_train_config(None, _overrides("--fp8=yes")).precision.fp8 is True
    assert load_train_config(None, _overrides("--no-progress")).logging.progress is False
    assert load_train_config(None, _overrides("--tensorboard", "0")).logging.tensorboard is False
    with pytest.raises(ConfigError, match="must be bool"):
        load_train_config(None, _overrides("--fp8", "maybe"))


def test_flags_override_the_run_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 0.01\nschedule:\n  steps: 7\n")
    config = load_train_config(str(path), _overrides("--lr", "0.02", "--micro-batch", "2", "--global-batch", "4"))
    assert (config.optimizer.lr, config.schedule.steps, config.data.micro_batch) == (0.02, 7, 2)


def test_bad_values_are_one_sentence_config_errors():
    cases = [
        ({"steps": "many"}, "steps must be int"),
        ({"pp": 0}, "pp must be positive"),
        ({"ep": -1}, "ep must be positive"),
        ({"dp": 0}, "dp must be positive"),
        ({"epochs": 0}, "epochs must be positive"),
        ({"pipeline": "gpipe"}, "1f1b, zb1p, dualpipe, dualpipev"),
        ({"dispatcher": "nccl"}, "auto, local, alltoall, deepep"),
        ({"task": "rl"}, "pretrain, sft"),
        ({"on_long": "wrap"}, "skip, truncate, error"),
        ({"rope_scaling": "ntk"}, "none, yarn"),
        ({"rope_factor": 0.5}, "rope_factor"),
        ({"micro_batch": 3, "global_batch": 8}, "multiple"),
        ({"mtp_switch": 1.5}, "mtp_switch"),
        ({"use_ema": True}, "use_ema needs ema_decay"),
        ({"optimizer": {"lrr": 1}}, "did you mean optimizer.lr"),
        ({"stepz": 3}, "did you mean steps"),
        ({"lr": 0.1, "optimizer": {"lr": 0.2}}, "twice"),
        ({"optimizer": {"lr": None}}, "cannot be none"),
        ({"recompute": "selectiv"}, "did you mean selective"),
    ]
    for data, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)) as info:
            TrainConfig.from_dict(data)
        assert "\n" not in str(info.value)


def test_validate_normalises_values_set_in_code():
    config = TrainConfig()
    config.optimizer.lr, config.schedule.steps, config.precision.fp8 = "1e-3", 40.0, "yes"
    config.validate()
    assert (config.optimizer.lr, config.schedule.steps, config.precision.fp8) == (0.001, 40, True)
    assert type(config.schedule.steps) is int
    config.memory.recompute = "partial"
    with pytest.raises(ConfigError, match="recompute must be one of none, selective, full"):
        config.validate()


def test_defaults_are_the_documented_ones():
    c = TrainConfig().validate()  # the embedded default of `dsv3 train` (README: tiny preset, stdlib corpus)
    assert (c.model.name, c.data.path, c.data.seq_len, c.data.micro_batch, c.data.global_batch) == (
        "tiny",
        None,
        256,
        8,
        8,
    )
    assert (c.optimizer.lr, c.optimizer.beta1, c.optimizer.beta2, c.optimizer.weight_decay) == (2e-3, 0.9, 0.95, 0.1)
    assert (c.schedule.steps, c.memory.recompute, c.precision.fp8, c.parallel.device) == (300, "none", False, "auto")
    assert (c.parallel.pp, c.parallel.dp, c.parallel.ep, c.parallel.pipeline, c.parallel.dispatcher) == (
        1,
        None,
        1,
        "1f1b",
        "auto",
    )
    assert (c.data.task, c.data.on_long, c.data.epochs, c.data.packing) == ("pretrain", "skip", None, True)
    assert (c.model.rope_scaling, c.model.rope_factor, c.parallel.trace) == ("none", 1.0, False)


def test_bad_flag_value_exits_2_with_one_line(capsys):
    code, _, err = cli(["train", "--pipeline", "gpipe", "--print-config"], capsys)
    assert_one_error(code, err, "dualpipev")


# ----------------------------------------------------------------------------- run files
SECTIONED = """
model:
  name: small
  rope_scaling: yarn
  rope_factor: 4
data:
  seq_len: 64
  micro_batch: 2
  global_batch: 6
  format: jsonl
optimizer:
  lr: 0.001
  eps: 1.0e-06
schedule:
  steps: 40
  final_lr: 7.3e-06
  final_steps: 2
moe:
  bias_update_speed: 0.001
  mtp_loss_weight: 0.3
  mtp_loss_weight_late: 0.1
precision:
  fp8: true
memory:
  recompute: selective
  optim_states: bf16
parallel:
  ep: 2
  pipeline: dualpipev
checkpoint:
  keep_last: 3
logging:
  progress: false
run:
  dir: runs/x
  seed: 7
"""

FLAT = """
model: small
rope_scaling: yarn
rope_factor: 4
seq_len: 64
micro_batch: 2
global_batch: 6
data_format: jsonl
lr: 0.001
eps: 1.0e-06
steps: 40
final_lr: 7.3e-06
final_steps: 2
bias_update_speed: 0.001
mtp_loss_weight: 0.3
mtp_loss_weight_late: 0.1
fp8: true
recompute: selective
optim_states: bf16
ep: 2
pipeline: dualpipev
keep_last: 3
progress: false
run_dir: runs/x
seed: 7
log_every: 1
"""

TOML = """
optimizer.lr = 0.001
optimizer.eps = 1e-6
[model]
name = "small"
rope_scaling = "yarn"
rope_factor = 4
[data]
seq_len = 64
micro_batch = 2
global_batch = 6
format = "jsonl"
[schedule]
steps = 40
final_lr = 7.3e-6
final_steps = 2
[moe]
bias_update_speed = 0.001
mtp_loss_weight = 0.3
mtp_loss_weight_late = 0.1
[precision]
fp8 = true
[memory]
recompute = "selective"
optim_states = "bf16"
[parallel]
ep = 2
pipeline = "dualpipev"
[checkpoint]
keep_last = 3
[logging]
progress = false
[run]
dir = "runs/x"
seed = 7
"""


def test_sectioned_flat_and_toml_run_files_give_the_same_config(tmp_path):
    (tmp_path / "sectioned.yaml").write_text(SECTIONED)
    (tmp_path / "flat.yaml").write_text(FLAT)
    (tmp_path / "run.toml").write_text(TOML)
    (tmp_path / "dotted.yaml").write_text(
        "\n".join(  # "optimizer.lr: ..." keys, mixed with flat ones
            f"{'optimizer.' if k in ('lr', 'eps') else ''}{k}: {v}"
            for k, v in (line.split(": ", 1) for line in FLAT.strip().splitlines())
        )
    )
    configs = [
        load_train_config(str(tmp_path / name)) for name in ("sectioned.yaml", "flat.yaml", "run.toml", "dotted.yaml")
    ]
    for c in configs:
        assert c.to_dict() == configs[0].to_dict()
    c = configs[0]  # the values written above, read back through the sections
    assert (c.model.name, c.model.rope_scaling, c.model.rope_factor) == ("small", "yarn", 4.0)
    assert (c.data.seq_len, c.data.micro_batch, c.data.global_batch, c.data.format) == (64, 2, 6, "jsonl")
    assert (c.optimizer.lr, c.optimizer.eps, c.optimizer.beta2) == (1e-3, 1e-6, 0.95)
    assert (c.schedule.steps, c.schedule.final_lr, c.schedule.final_steps, c.schedule.warmup_steps) == (
        40,
        7.3e-6,
        2,
        30,
    )
    assert (c.moe.bias_update_speed, c.moe.mtp_loss_weight, c.moe.mtp_loss_weight_late) == (1e-3, 0.3, 0.1)
    assert c.precision.fp8 is True and c.precision.fp8_gemm is True
    assert (c.memory.recompute, c.memory.optim_states) == ("selective", "bf16")
    assert (c.parallel.ep, c.parallel.pipeline, c.parallel.pp, c.parallel.dp) == (2, "dualpipev", 1, None)
    assert (c.checkpoint.keep_last, c.logging.progress, c.run.dir, c.run.seed) == (3, False, "runs/x", 7)
    assert isinstance(c.model.rope_factor, float) and isinstance(c.data.seq_len, int)


def test_effective_config_round_trips_in_both_forms(tmp_path):
    from dsv3.train.config import save_effective_config

    (tmp_path / "flat.yaml").write_text(FLAT)
    config = load_train_config(str(tmp_path / "flat.yaml"))
    save_effective_config(config, str(tmp_path / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == [
        "model",
        "data",
        "optimizer",
        "schedule",
        "moe",
        "precision",
        "memory",
        "parallel",
        "checkpoint",
        "logging",
        "run",
        "rl",
    ]  # sectioned
    assert saved["optimizer"]["lr"] == 1e-3 and saved["parallel"]["pipeline"] == "dualpipev"
    assert "log_every" not in yaml.safe_dump(saved)
    assert TrainConfig.from_dict(saved) == config
    assert TrainConfig.from_dict(config.to_flat_dict()) == config


OLD_RUN_CONFIG = """\
model: {model}
init_from: null
data: {data}
data_format: null
data_field: text
data_glob: null
data_dtype: null
eos_token: null
tokenizer: {tokenizer}
val_fraction: 0.05
seq_len: 32
micro_batch: 4
global_batch: 8
batch_ramp_start: null
batch_ramp_steps: 0
steps: 6
lr: 0.003
min_lr: 0.0003
warmup_steps: 2
decay_start: 0.5
decay_end: 0.95
final_lr: null
final_steps: 0
beta1: 0.9
beta2: 0.95
eps: 1.0e-08
weight_decay: 0.1
grad_clip: 1.0
optim_states: fp32
bias_update_speed: null
bias_update_stop: 1.0
seq_aux_alpha: null
mtp_loss_weight: null
mtp_loss_weight_late: null
mtp_switch: 0.68
fp8: false
fp8_backend: auto
fp8_scale_format: fp32
fp8_gemm: true
recompute: none
ema_decay: null
use_ema: false
dtype: float32
device: auto
seed: 0
run_dir: {run_dir}
eval_every: 3
eval_batches: 2
save_every: 3
keep_last: 5
log_every: 1
load_every: 10
max_nonfinite: 5
sample_prompt: 'def '
sample_tokens: 8
tensorboard: false
progress: false
"""  # RUN_DIR/config.yaml exactly as dsv3 wrote it before the sections (flat, with log_every)


def _digest(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


@pytest.mark.timeout(300)
def test_old_flat_run_directory_still_resumes(train_setup, tmp_path):
    from dsv3.checkpoint.state import list_checkpoints
    from dsv3.train.loop import train
    from dsv3.train.rundir import resume_config

    run = tmp_path / "old"

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig.from_dict(quick_options(train_setup, run, steps=6)), log=lambda s: None, step_hook=stop_at_3)
    assert [s for s, _ in list_checkpoints(str(run))] == [3]
    old = OLD_RUN_CONFIG.format(
        model=train_setup["model"], data=train_setup["corpus"], tokenizer=train_setup["tokenizer"], run_dir=str(run)
    )
    (run / "config.yaml").write_text(old)  # the run directory as an older dsv3 left it
    config = resume_config(str(run), {"steps": 7})
    assert (config.schedule.steps, config.optimizer.lr, config.data.micro_batch, config.run.dir) == (
        7,
        3e-3,
        4,
        str(run),
    )
    assert config.parallel.ep == 1 and config.data.task == "pretrain"  # new fields take their defaults
    result = train(None, resume=str(run), overrides={"steps": 7}, log=lambda s: None)
    assert result.step == 7
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    # issue 15: the overrides that applied are written to the run's effective config (a later plain
    # --resume continues to step 7), in the current sectioned form
    assert resume_config(str(run), {}).schedule.steps == 7 and (run / "config.yaml").read_text() != old


def test_print_config_prints_yaml_and_writes_nothing(train_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = _digest(tmp_path)
    flags = ["--model", "small", "--lr", "0.001", "--ep", "2", "--recompute", "selective", "--no-progress"]
    assert main(["train", "--print-config", *flags]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["optimizer"]["lr"] == 1e-3 and printed["parallel"]["ep"] == 2
    assert printed["memory"]["recompute"] == "selective" and printed["logging"]["progress"] is False
    assert printed["model"]["name"] == "small" and printed["run"]["dir"] is None
    assert _digest(tmp_path) == before and not (tmp_path / "runs").exists()  # no run directory, no file

    # with a run file and with --resume: the file's / the run's config, with the flags applied
    (tmp_path / "run.yaml").write_text(SECTIONED)
    assert main(["train", "--config", "run.yaml", "--steps", "9", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["schedule"]["steps"] == 9 and printed["parallel"]["pipeline"] == "dualpipev"
    run = tmp_path / "existing"
    run.mkdir()
    (run / "config.yaml").write_text(
        OLD_RUN_CONFIG.format(model="tiny", data="null", tokenizer="null", run_dir=str(run))
    )
    before = _digest(tmp_path)
    assert main(["train", "--resume", str(run), "--steps", "12", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["schedule"]["steps"] == 12 and printed["run"]["dir"] == str(run)
    assert printed["optimizer"]["lr"] == 3e-3
    assert _digest(tmp_path) == before


# ----------------------------------------------------------------------------- parse_size
def test_parse_size_one_parser_for_plan_and_checkpoints():
    from dsv3.model import hf
    from dsv3.plan import precision

    assert precision.parse_size is parse_size and hf.parse_size is parse_size  # one function
    assert parse_size("80GiB") == 80 * 1024**3
    assert parse_size("80 GB") == 80 * 1000**3
    assert parse_size("80G") == 80 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5TiB") == 3 * 1024**4 // 2
    assert parse_size("200KB") == 200_000
    assert parse_size(12345) == 12345
    assert parse_size("5e9", unit_required=False) == 5 * 10**9
    assert parse_size("7", unit_required=False) == 7
    for bad in ("80", "eighty GiB", "80 parsecs", "", "1e9"):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad, "--gpu-memory")


def test_plan_package_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, dsv3.plan.precision, dsv3.utils.size, dsv3.cli; dsv3.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""dsv3.layout: the one layout check's messages, the choice lists the CLI accepts, and the import floors."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.cli import build_parser
from dsv3.config import load_preset
from dsv3.errors import ConfigError
from dsv3.layout import (
    ATTENTION_IMPLS,
    DISPATCHERS,
    FP8_BACKENDS,
    FP8_SCALE_FORMATS,
    RECOMPUTE_MODES,
    SCHEDULES,
    TP_CONVENTIONS,
    check_layout,
    devices_of_stage,
    fill_microbatches,
    pipeline_devices,
    stage_devices,
)
from dsv3.plan.layout import Layout
from dsv3.schedules import build_schedule
from dsv3.train.config import options

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv3"


# ----------------------------------------------------------------------------- the one check
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(world_size=4, pp=0), "--pp must be a positive integer, got 0"),
        (dict(world_size=4, ep=True), "--ep must be a positive integer, got True"),
        (dict(world_size=4, pp=2, schedule="gpipe"), "unknown schedule 'gpipe'; choose one of 1f1b, zb1p"),
        (dict(world_size=4, pp=5, num_layers=4), "fewer than --pp 5 pipeline stages: 4 layers cannot fill --pp 5"),
        (dict(world_size=4, pp=3, schedule="dualpipe"), "DualPipe needs an even number of pipeline stages, got --pp 3"),
        (dict(world_size=6, pp=4), "6 processes do not factor into pipelines of 4 devices"),
        (dict(world_size=5, pp=4, schedule="dualpipev"), "not a multiple of the 2 pipeline devices of --pp 4"),
        (dict(world_size=4, pp=2, dp=3), "does not factor as 2 pipeline devices x --dp 3"),
        (dict(world_size=6, pp=2, ep=2), "--ep 2 does not divide the data-parallel degree 3"),
        (dict(world_size=8, pp=2, ep=4, n_routed_experts=6), "--ep 4 does not divide the model's 6 routed experts"),
        (dict(dp=2, ep=4, tp=2, etp=2), "EP x ETP = 8 must divide DP x TP = 4"),
        (dict(pp=4, schedule="dualpipe", microbatches=6), "needs an even number of micro-batches >= 8"),
        (dict(pp=4, schedule="dualpipev", microbatches=3), "needs a number of micro-batches >= 4, got microbatches=3"),
    ],
)
def test_bad_layouts_are_one_sentence(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        check_layout(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message and message.endswith("."), message


def test_good_layouts_fill_in_dp():
    assert check_layout(8, pp=4, ep=2, schedule="dualpipev") == (4, 4, 2)  # 2 devices x dp 4
    assert check_layout(16, pp=4, dp=4, ep=4, n_routed_experts=16, num_layers=4, microbatches=8) == (4, 4, 4)
    assert check_layout(pp=2, dp=2, ep=4, tp=2, n_routed_experts=8) == (2, 2, 4)  # EP re-folds DP x TP
    assert check_layout(1) == (1, 1, 1)


def test_planner_runtime_and_schedules_share_the_check():
    """The planner's Layout.validate, build_schedule and the world raise the same sentence for one fault."""
    tiny = load_preset("tiny")
    messages = set()
    for call in (
        lambda: Layout(pp=3, schedule="dualpipev", seq_len=256).validate(tiny),
        lambda: build_schedule("dualpipev", 3, 6),
        lambda: check_layout(3, pp=3, schedule="dualpipev"),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        messages.add(str(info.value))
    assert len(messages) == 1, messages


# ----------------------------------------------------------------------------- the vocabulary
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4, 6])
def test_devices_and_stages_agree_with_the_built_schedules(name, pp):
    schedule = build_schedule(name, pp, fill_microbatches(pp, name))
    assert schedule.devices == pipeline_devices(pp, name) == len(stage_devices(pp, name))
    assert [sorted(s) for s in schedule.device_stages] == [sorted(s) for s in stage_devices(pp, name)]
    holders = devices_of_stage(pp, name)
    assert all(len(h) == (2 if name == "dualpipe" else 1) for h in holders)


# ----------------------------------------------------------------------------- the CLI's choices
def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    "flat,choices",
    [
        ("recompute", RECOMPUTE_MODES),
        ("pipeline", SCHEDULES),
        ("dispatcher", DISPATCHERS),
        ("fp8_backend", FP8_BACKENDS),
        ("fp8_scale_format", FP8_SCALE_FORMATS),
    ],
)
def test_train_flags_accept_the_layout_choices(flat, choices):
    opt = next(o for o in options() if o.flat == flat)
    assert opt.choices == choices
    train = _subparser(build_parser(), "train")
    assert _action(train, "--" + flat.replace("_", "-")).metavar == "{" + ",".join(choices) + "}"


def test_plan_flags_accept_the_layout_choices():
    plan = _subparser(build_parser(), "plan")
    assert tuple(_action(plan, "--tp-convention").choices) == TP_CONVENTIONS
    for flag, names in (("--schedule", SCHEDULES), ("--recompute", RECOMPUTE_MODES), ("--attention", ATTENTION_IMPLS)):
        assert all(name in _action(plan, flag).help for name in names), flag
    tiny = load_preset("tiny")
    for name in SCHEDULES:
        Layout(pp=2, schedule=name, seq_len=256).validate(tiny)
    for name in RECOMPUTE_MODES:
        Layout(recompute=name, seq_len=256).validate(tiny)
    for name in ATTENTION_IMPLS:
        Layout(attention=name, seq_len=256).validate(tiny)


# ----------------------------------------------------------------------------- the floors
def test_layout_and_schedules_import_no_torch():
    code = "import dsv3.layout, dsv3.schedules, sys; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any level (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("plan", ("torch", "dsv3.parallel", "dsv3.train")),
        ("parallel", ("dsv3.train",)),
        ("memory", ("dsv3.train",)),
    ],
)
def test_package_floors(package, forbidden):
    """No planner module imports torch, the runtime or the trainer; parallel/ and memory/ never import train/."""
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    bad = {
        f"{f.relative_to(SRC)} imports {m}"
        for f in files
        for m in _imports(f)
        if any(m == x or m.startswith(x + ".") for x in forbidden)
    }
    assert not bad, sorted(bad)
    for f in (SRC / "layout.py", SRC / "schedules.py"):  # the bottom floor: errors only
        assert {m for m in _imports(f) if m.startswith("dsv3")} <= {"dsv3.errors", "dsv3.layout"}, f

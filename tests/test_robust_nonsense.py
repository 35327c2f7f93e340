"""Robustness II, classes 4-5: nonsense is refused with one line (exit 2), before anything is written, and
unbounded work (a passkey probe past the context, or 100k tokens on a CPU) is refused or marked.

Each CLI test checks the exit code, the single ``dsv3: error:`` line, and that the tree is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_error, cli
from robust_helpers import flags, tiny_options, tree_digest

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.train.config import TrainConfig
from dsv3.train.evaluation import EvalReport, context_note
from dsv3.train.loop import train

DS_TEMPLATE = Path(__file__).parent / "data" / "deepseek_v3" / "tokenizer_config.json"


@pytest.fixture(scope="module")
def finished_run(train_setup, tmp_path_factory):
    """A finished 2-step pre-training run of the small model (max_position_embeddings 256, no RoPE scaling)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_CACHE", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
        run = tmp_path_factory.mktemp("robust_nonsense") / "run"
        train(TrainConfig.from_dict(tiny_options(train_setup, run)), log=lambda s: None)
    return run


def _refused(argv, capsys, tree, *words):
    before = tree_digest(tree)
    line = assert_one_error(*cli(argv, capsys)[::2], *words)
    assert tree_digest(tree) == before
    return line


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--rope-factor", "4"], ("--rope-scaling yarn",)),
        (["--rope-factor", "inf"], ("rope_factor", "finite")),
        (["--lr", "nan"], ("lr", "finite")),
        (["--trace"], ("--trace", "pipeline")),
        (["--steps", "0"], ("steps",)),
        (["--seq-len", "100000"], ("max_position_embeddings",)),
    ],
)
def test_print_config_runs_every_check_first(train_setup, tmp_path, capsys, extra, words):
    argv = ["train", *flags(tiny_options(train_setup, tmp_path / "new")), *extra]
    for print_config in ([], ["--print-config"]):
        code, out, err = cli(argv + print_config, capsys)
        assert_one_error(code, err, *words)
        assert out == ""  # no YAML printed before the error
    assert not (tmp_path / "new").exists()


def test_print_config_refuses_what_resume_refuses(finished_run, tmp_path, capsys):
    _refused(
        ["train", "--resume", finished_run, "--seq-len", "32", "--print-config"],
        capsys,
        finished_run,
        "--seq-len",
        "cannot change on --resume",
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    _refused(["train", "--run-dir", tmp_path / "full", "--print-config"], capsys, tmp_path, "not empty")
    code, out, _ = cli(["train", "--resume", finished_run, "--steps", "9", "--print-config"], capsys)
    assert code == 0 and "steps: 9" in out


@pytest.mark.parametrize(
    "text,words",
    [
        ("[optimizer]\nlr = true\n", ("lr", "float")),
        ("[data]\nseq_len = [1, 2]\n", ("seq_len", "int")),
        ("[data]\npath = 5\n", ("path", "str")),
        ("optimizer = 3\n", ("section optimizer", "mapping")),
    ],
)
def test_wrong_type_in_a_toml_section(tmp_path, capsys, text, words):
    (tmp_path / "run.toml").write_text(text)
    for print_config in ([], ["--print-config"]):
        _refused(["train", "--config", tmp_path / "run.toml", *print_config], capsys, tmp_path, *words)


def test_unknown_chat_role_names_file_line_and_field(train_setup, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    chat.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    opts = tiny_options(train_setup, tmp_path / "sft", task="sft", data=str(chat), chat_template=str(DS_TEMPLATE))
    line = _refused(["train", *flags(opts)], capsys, tmp_path, "robot", "line 2", "role")
    assert str(chat) in line


def test_generate_refuses_prompt_with_prompts_file(finished_run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    _refused(
        ["generate", finished_run, "--prompt", "x", "--prompts-file", tmp_path / "prompts.txt"],
        capsys,
        finished_run,
        "--prompt",
        "--prompts-file",
    )


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--seq-len", "0", "--passkey", "64"], ("--seq-len", "positive")),
        (["--passkey", "100k"], ("CPU",)),
    ],
)
def test_eval_refuses_lengths_it_cannot_honour(finished_run, capsys, argv, words):
    _refused(["eval", finished_run, *argv], capsys, finished_run, *words)


def test_eval_past_the_context_says_so_next_to_the_number(finished_run, capsys):
    """The small model extends 64 original positions to 256 with YaRN: 128 is past the original context, 512
    past max_position_embeddings; each number says so."""
    code, out, err = cli(["eval", finished_run, "--passkey", "64,128,512", "--passkey-trials", "1"], capsys)
    assert code == 0, err
    lines = {int(line.split()[2]): line for line in out.splitlines() if line.startswith("passkey at")}
    assert not lines[64].endswith(")")
    assert lines[128].endswith("(beyond the original context of 64 tokens: yarn extension)")
    assert lines[512].endswith("(beyond max_position_embeddings 256: extrapolated)")


def test_probe_past_the_trained_context_is_marked_next_to_the_number():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    extended = ModelConfig(max_position_embeddings=256, rope_scaling=yarn)
    assert context_note(64, extended, "--passkey", "cpu") == ""
    assert "beyond the original context of 64" in context_note(128, extended, "--passkey", "cpu")
    assert "extrapolated" in context_note(512, extended, "--passkey", "cpu")
    with pytest.raises(ConfigError, match="no RoPE scaling"):
        context_note(512, ModelConfig(max_position_embeddings=256, rope_scaling=None), "--passkey", "cpu")
    report = EvalReport(
        checkpoint="c", passkey={128: 0.5}, notes={128: context_note(128, extended, "--passkey", "cpu")}
    )
    assert (
        report.lines()[-1]
        == "passkey at 128 tokens: 50% retrieved (beyond the original context of 64 tokens: yarn extension)"
    )


def _bare_jinja(tmp_path) -> Path:
    path = tmp_path / "chat.jinja"
    path.write_text(json.loads(DS_TEMPLATE.read_text())["chat_template"])
    return path


def _chat_file(tmp_path, turns=1, words=3) -> Path:
    chat = tmp_path / "chat.jsonl"
    record = {
        "messages": [
            m
            for _ in range(turns)
            for m in ({"role": "user", "content": "hello " * words}, {"role": "assistant", "content": "hi " * words})
        ]
    }
    chat.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    return chat


def test_sft_with_a_bare_jinja_names_the_missing_special_token(finished_run, train_setup, tmp_path, capsys):
    """SFT from a dsv3 pre-training run with a .jinja template: the template's bos/eos tokens are not defined
    anywhere (a bare .jinja carries none), and the message says so instead of blaming the conversation."""
    checkpoint = sorted((finished_run / "checkpoints").iterdir())[-1]
    opts = tiny_options(
        train_setup,
        tmp_path / "sft",
        task="sft",
        data=str(_chat_file(tmp_path)),
        chat_template=str(_bare_jinja(tmp_path)),
        init_from=str(checkpoint),
        model=None,
        seq_len=128,
    )
    _refused(["train", *flags(opts)], capsys, tmp_path, "_token", "tokenizer_config.json")


def test_long_conversation_under_on_long_error_names_file_line_and_field(train_setup, tmp_path, capsys):
    chat = _chat_file(tmp_path, turns=8, words=20)
    opts = tiny_options(
        train_setup, tmp_path / "sft", task="sft", data=str(chat), chat_template=str(DS_TEMPLATE), on_long="error"
    )
    line = _refused(["train", *flags(opts)], capsys, tmp_path, "line 1", "messages", "--seq-len")
    assert str(chat) in line


@pytest.mark.parametrize(
    "schedule,pp,world,global_batch,micro_batch",
    [
        ("dualpipe", 2, 2, 4, 2),
        ("dualpipe", 4, 4, 12, 2),
        ("dualpipev", 4, 2, 6, 2),
        ("dualpipe", 2, 4, 4, 1),
    ],
)
def test_pipeline_layout_error_names_train_flags_with_values_that_work(schedule, pp, world, global_batch, micro_batch):
    import re

    from dsv3.parallel.pipeline.train import check_pipeline_layout

    layout = dict(pp=pp, schedule=schedule, world_size=world)
    with pytest.raises(ConfigError) as info:
        check_pipeline_layout(8, global_batch=global_batch, micro_batch=micro_batch, **layout)
    line = str(info.value)
    assert "microbatches=" not in line and "--global-batch" in line, line
    bigger = int(re.search(r"use --global-batch (\d+)", line).group(1))
    check_pipeline_layout(8, global_batch=bigger, micro_batch=micro_batch, **layout)  # the advice works
    smaller = re.search(r"--micro-batch (\d+) with this global batch", line)
    if smaller:
        check_pipeline_layout(8, global_batch=global_batch, micro_batch=int(smaller.group(1)), **layout)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_layout_under_torchrun_is_one_line_from_rank_0(train_setup, tmp_path):
    """torchrun's agent stops the other ranks once rank 0 failed: the error is printed once, and the summary
    torchrun prints after it names rank 0 (exit code 2) as the root cause."""
    import os
    import subprocess
    import sys

    from dist_helpers import free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        torchrun,
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "dsv3",
        "train",
        *flags(tiny_options(train_setup, tmp_path / "bad")),
        "--ep",
        "3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("dsv3: error:")]
    assert len(lines) == 1 and "--ep 3" in lines[0], done.stderr[-3000:]
    root = done.stderr.split("Root Cause")[-1]
    assert "rank      : 0" in root and "exitcode  : 2" in root, root
    assert not (tmp_path / "bad").exists()


def test_trace_is_refused_only_when_asked_for_without_a_pipeline():
    from dsv3.train.preflight import check_trace

    traced = TrainConfig.from_dict({"trace": True})  # pp 1
    with pytest.raises(ConfigError, match="--trace"):
        check_trace(traced, {}, None)  # a new run
    with pytest.raises(ConfigError, match="--trace"):
        check_trace(traced, {"trace": True}, "RUN")  # --resume RUN --trace
    check_trace(traced, {"pp": 1}, "RUN")  # a pipeline run's saved trace, continued in one process
    check_trace(TrainConfig.from_dict({"trace": True, "pp": 2}), {}, None)

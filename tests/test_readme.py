"""The README's commands, run as written but on tiny settings (a doc-test of README.md).

Every ``dsv3 ...`` line of the README's ``sh`` blocks is run in order in a scratch directory
that holds what the commands name (``corpus/``, ``run.yaml`` = the README's YAML example,
``data/corpus.jsonl``). "Tiny settings" means: a new training run gets the test model and a
few steps of 2 x 16 tokens appended (later flags win); ``--resume`` gets only ``--steps``
(anything else would be refused, as the README's "When things go wrong" says); ``generate``
a few tokens; ``memory`` the test model. The Python example runs against the run it trained.
Each command must exit 0 with no traceback.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from dsv3.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_commands() -> list[list[str]]:
    """The argv of every ``dsv3`` command in the README's sh blocks, comments removed."""
    out = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            if line.strip().startswith("dsv3 ") or line.strip() == "dsv3":
                out.append(shlex.split(line, comments=True)[1:])
    return out


def _set(argv: list[str], flag: str, value) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced where present, else appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    return argv


def tiny(argv: list[str], setup) -> list[str]:
    """A README command on tiny settings."""
    if argv and argv[0] == "train" and "--resume" in argv:
        return _set(argv, "--steps", 3)
    if not argv or argv[0] == "train":
        argv = argv or ["train"]
        if "--data" not in argv and "--config" not in argv:
            argv = _set(argv, "--data", "corpus/")  # the stdlib default works the same, just slower
        for flag, value in (
            ("--model", setup["model"]),
            ("--steps", 2),
            ("--seq-len", 16),
            ("--micro-batch", 2),
            ("--global-batch", 2),
            ("--eval-every", 2),
            ("--eval-batches", 1),
            ("--save-every", 2),
            ("--sample-tokens", 4),
            ("--tensorboard", "false"),
            ("--progress", "false"),
            ("--val-fraction", 0.05),
        ):
            argv = _set(argv, flag, value)
        return argv
    if argv[0] == "generate":
        return _set(argv, "--max-tokens", 4)
    if argv[0] == "memory":
        for flag, value in (
            ("--model", setup["model"]),
            ("--data", "corpus/"),
            ("--tokenizer", setup["tokenizer"]),
            ("--seq-len", 16),
            ("--micro-batch", 2),
            ("--steps", 1),
        ):
            argv = _set(argv, flag, value)
        return argv
    return argv


@pytest.fixture
def workdir(train_setup, tmp_path, monkeypatch):
    """A scratch directory holding what the README's commands name."""
    shutil.copytree(train_setup["corpus"], tmp_path / "corpus")
    (tmp_path / "data").mkdir()
    import json

    docs = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "corpus").iterdir())]
    (tmp_path / "data" / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    yaml_blocks = _blocks("yaml")
    if yaml_blocks:
        (tmp_path / "run.yaml").write_text(yaml_blocks[0])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_commands():
    commands = readme_commands()
    assert any(c[:1] == ["train"] for c in commands) and len(commands) >= 5


def test_the_report_table_names_files_that_exist():
    """The README's table from report section to file: ten rows, every file named exists."""
    text = README.read_text(encoding="utf-8").split("## From the report to the code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 10, rows
    for row in rows:
        files = re.findall(r"`(src/dsv3/[\w/]+\.py)`", row)
        assert files, row
        missing = [f for f in files if not (README.parent / f).is_file()]
        assert not missing, f"{row}: {missing} do not exist"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_readme_command_runs(train_setup, workdir, capsys):
    trained = None
    for argv in readme_commands():
        run = tiny(argv, train_setup)
        code = main(run)
        captured = capsys.readouterr()
        assert code == 0, f"dsv3 {shlex.join(argv)} -> {code}: {captured.err[-2000:]}"
        assert "Traceback" not in captured.err
        if run[0] == "train" and "--run-dir" in run:
            trained = workdir / run[run.index("--run-dir") + 1]
    # the Python example, against the run the README trained
    for block in _blocks("python"):
        if trained is None:
            break
        code = re.sub(r'from_pretrained\("[^"]*"\)', f"from_pretrained({str(trained)!r})", block)
        prelude = (
            "import torch\ninput_ids = torch.randint(0, 512, (1, 8))\nlabels = torch.roll(input_ids, -1, dims=1)\n"
        )
        exec(compile(prelude + code, "README.md", "exec"), {})

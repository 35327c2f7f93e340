"""Robustness II, class 1: no command that writes destroys what was there.

The property test points every output option of every writing sub-command at (a) a non-empty directory
it did not write, (b) an existing file, (c) a path under a file and (d) the run directory, and checks the
exit code, the single ``dsv3: error:`` line, and that every file present before is byte-identical after
(a digest of the whole tree). A command's own earlier output is replaced (atomically).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_one_error, cli
from robust_helpers import flags, tiny_options, tree_digest

from dsv3.config import ModelConfig
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.parallel.checkpoint import save_sharded
from dsv3.parallel.world import ParallelContext
from dsv3.parallel.zero import ZeroAdamW
from dsv3.train.config import TrainConfig
from dsv3.train.loop import train


def add_sharded_checkpoint(run, step: int) -> str:
    """Write a one-process sharded checkpoint ``run/dcp-{step}`` of a model built from the run's model config."""
    torch.manual_seed(step)
    model = DeepseekV3ForCausalLM(ModelConfig.from_json_file(os.path.join(run, "model_config.json")))
    ctx = ParallelContext.single()
    return save_sharded(str(run), step, model=model, optimizer=ZeroAdamW(model, ctx, lr=1e-3), ctx=ctx)


@pytest.fixture(scope="module")
def world(train_setup, tmp_path_factory):
    """A finished 2-step run (one-process checkpoint, a sharded one, metrics) and an expert-load file."""
    root = tmp_path_factory.mktemp("robust_outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_CACHE", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
        run = root / "run"
        train(TrainConfig.from_dict(tiny_options(train_setup, run)), log=lambda s: None)
    add_sharded_checkpoint(run, 2)
    (root / "loads.json").write_text(json.dumps([[1, 2, 3, 4], [4, 3, 2, 1]]))
    return root, run


def _targets(tmp_path, run):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    existing = tmp_path / "notes.txt"
    existing.write_text("precious")
    return {"foreign_dir": foreign, "existing_file": existing, "under_file": existing / "sub" / "out", "run_dir": run}


#: Each writing sub-command as argv for an output path; an allowed (command, target) writes (plot into its run).
COMMANDS = {
    "export": lambda w, t: ["export", w["run"], t],
    "generate --stats": lambda w, t: ["generate", w["run"], "--max-tokens", "2", "--stats", t],
    "eplb --json": lambda w, t: [
        "eplb",
        "--loads",
        w["loads"],
        "--replicas",
        "4",
        "--nodes",
        "1",
        "--gpus",
        "2",
        "--json",
        t,
    ],
    "plan schedule --plot": lambda w, t: [
        "plan",
        "schedule",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--plot",
        t,
    ],
    "plot --out": lambda w, t: ["plot", w["run"], "--out", t],
    "train --run-dir": lambda w, t: ["train", *flags(tiny_options(w["setup"], t))],
}
ALLOWED = {("plot --out", "run_dir")}  # plot's default output directory is the run it plots


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_writing_command_destroys_anything(world, train_setup, tmp_path, capsys, command):
    root, base = world
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base, run)
    w = {"run": run, "loads": root / "loads.json", "setup": train_setup}
    for target, path in _targets(tmp_path, run).items():
        before = tree_digest(tmp_path)
        code, _, err = cli(COMMANDS[command](w, path), capsys)
        after = tree_digest(tmp_path)
        lost = {k for k, v in before.items() if after.get(k) != v}
        if (command, target) in ALLOWED:
            assert code == 0, err
            assert lost <= {"run/loss.png", "run/expert_load.png"}, lost  # its own earlier plots, redrawn
            continue
        assert_one_error(code, err)
        assert not lost, (command, target, lost)
        assert set(after) == set(before), (command, target, set(after) - set(before))


@pytest.mark.timeout(180)
def test_own_outputs_are_replaced_and_exports_are_self_contained(world, tmp_path, capsys):
    root, run = world
    out = tmp_path / "hf"
    for _ in range(2):  # the second export replaces the first one (its own output)
        code, _, err = cli(["export", run, out], capsys)
        assert code == 0, err
    names = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", "generation_config.json", "export.json"} <= names
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == names - {"export.json"}
    (out / "extra.txt").write_text("a file the user added")  # no longer only the export's files: refused
    assert_one_error(*cli(["export", run, out], capsys)[::2], "not empty")
    os.remove(out / "extra.txt")
    code, text, err = cli(["generate", out, "--max-tokens", "3", "--temperature", "0"], capsys)
    assert code == 0, err  # the export alone is enough to sample from
    stats = tmp_path / "stats.json"
    for _ in range(2):
        assert cli(["generate", run, "--max-tokens", "2", "--stats", stats], capsys)[0] == 0
    placement = tmp_path / "placement.json"
    for _ in range(2):
        assert (
            cli(
                [
                    "eplb",
                    "--loads",
                    root / "loads.json",
                    "--replicas",
                    "4",
                    "--nodes",
                    "1",
                    "--gpus",
                    "2",
                    "--json",
                    placement,
                ],
                capsys,
            )[0]
            == 0
        )
    png = tmp_path / "t.png"
    for _ in range(2):
        assert (
            cli(["plan", "schedule", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--plot", png], capsys)[
                0
            ]
            == 0
        )


def test_relative_paths_and_one_directory_for_two_roles(world, tmp_path, capsys, monkeypatch):
    """A careless user: relative paths, the checkpoint as its own output, the arguments swapped."""
    _, run = world
    monkeypatch.chdir(run.parent)
    before = tree_digest(run)
    assert_one_error(*cli(["export", "run", "run"], capsys)[::2], "run directory")
    assert_one_error(*cli(["export", "run/dcp-00000002", "run/dcp-00000002"], capsys)[::2], "run directory")
    assert_one_error(*cli(["export", str(tmp_path / "new"), "run"], capsys)[::2], "arguments are CHECKPOINT OUT_DIR")
    assert tree_digest(run) == before
    assert not (tmp_path / "new").exists()


CHATML = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_on_a_dsv3_run_then_eval_and_export_need_nothing_else(world, train_setup, tmp_path, capsys):
    """docs/sft.md end to end: SFT on a dsv3 pre-training run's checkpoint with a tokenizer_config.json naming the
    run tokenizer's special tokens; the SFT run's checkpoints and its export carry the template, so eval on chat data
    and generate work on each with no other argument."""
    _, run = world
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": CHATML, "bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    chat = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("yes", "no", "maybe", "never", "always", "often")
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    opts = tiny_options(
        train_setup,
        tmp_path / "sft",
        task="sft",
        data=str(chat),
        chat_template=str(config),
        init_from=str(checkpoint),
        model=None,
        seq_len=32,
        val_fraction=0.0,
        eval_every=1000,
    )
    code, _, err = cli(["train", *flags(opts)], capsys)
    assert code == 0, err
    sft_checkpoint = sorted((tmp_path / "sft" / "checkpoints").iterdir())[-1]
    assert (sft_checkpoint / "tokenizer_config.json").is_file()  # the run's template travels with its checkpoints
    export = tmp_path / "sft-hf"
    assert cli(["export", tmp_path / "sft", export], capsys)[0] == 0  # a one-process run exports too
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    for target in (sft_checkpoint, export):
        code, out, err = cli(["eval", target, "--data", chat, "--seq-len", "32"], capsys)
        assert code == 0 and "assistant tokens" in out, err
    code, out, err = cli(["generate", export, "--prompt", "<|user|>say yes<|assistant|>", "--max-tokens", "3"], capsys)
    assert code == 0, err


def test_ctrl_c_in_the_middle_of_an_export_keeps_the_previous_one(world, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the shards are written: exit 130, the earlier export byte-identical, no temporary left."""
    import dsv3.model.hf as hf

    _, run = world
    out = tmp_path / "hf"
    assert cli(["export", run, out], capsys)[0] == 0
    before = tree_digest(tmp_path)
    real = hf.write_pretrained

    def interrupted(model, directory, **kwargs):
        real(model, directory, **kwargs)  # the shards are on disk, the directory not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_pretrained", interrupted)
    code, _, err = cli(["export", run, out], capsys)
    assert code == 130 and err == ["dsv3: interrupted"], err
    assert tree_digest(tmp_path) == before  # nothing half-written, nothing left behind


def test_plot_out_onto_a_run_file_is_refused(world, tmp_path, capsys):
    import shutil

    _, base = world
    run = tmp_path / "run"
    shutil.copytree(base, run)
    before = tree_digest(tmp_path)
    for out in (
        run / "metrics.jsonl",
        run / "checkpoints",
        run / "checkpoints" / "step-0000002" / "plots",
        run / "dcp-00000002",
        tmp_path,
    ):
        assert_one_error(*cli(["plot", run, "--out", out], capsys)[::2])
    assert tree_digest(tmp_path) == before
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n a figure dsv3 did not draw")
    assert_one_error(*cli(["plot", run, "--out", figures], capsys)[::2], "not empty")
    assert (figures / "loss.png").read_bytes().endswith(b"did not draw")
    assert cli(["plot", run, "--out", tmp_path / "new"], capsys)[0] == 0
    assert cli(["plot", run, "--out", tmp_path / "new"], capsys)[0] == 0  # its own plots are redrawn

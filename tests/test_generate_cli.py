"""``dsv3 generate`` as a user drives it: batches, speculative decoding, statistics, placements, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_error, cli, small_config

from dsv3.model import DeepseekV3ForCausalLM


@pytest.fixture(scope="module")
def checkpoint(train_setup, tmp_path_factory):
    """A random small model with one MTP module, saved as a checkpoint directory with its tokenizer."""
    root = tmp_path_factory.mktemp("gen_ckpt")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config(vocab_size=512, max_position_embeddings=64))
    model.save_pretrained(root / "ckpt")
    shutil.copy(train_setup["tokenizer"], root / "ckpt" / "tokenizer.json")
    return root / "ckpt"


def test_prompts_file_batch_equals_each_prompt_alone(checkpoint, tmp_path, capsys):
    prompts = ["def f(x):", "import", "class A:  # a longer prompt than the others"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    code, out, _ = cli(
        [
            "generate",
            str(checkpoint),
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--stats",
            str(tmp_path / "stats.json"),
        ],
        capsys,
    )
    assert code == 0
    alone = []
    for p in prompts:
        code, one, _ = cli(
            ["generate", str(checkpoint), "--prompt", p, "--max-tokens", "6", "--temperature", "0"], capsys
        )
        alone.append(one)
    assert out == "".join(alone)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["mode"] == "batched" and stats["prompts"] == 3
    assert len(stats["expert_load"]) == 2 and len(stats["expert_load"][0]) == 8  # main MoE layers (MTP dropped)


def test_speculative_cli_prints_only_text_and_reports_stats(checkpoint, tmp_path, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "def ", "--max-tokens", "8", "--temperature", "0"]
    code, plain, _ = cli(argv, capsys)
    assert code == 0
    code, spec, err = cli(argv + ["--speculative", "mtp", "--stats", str(tmp_path / "s.json")], capsys)
    assert code == 0 and spec == plain  # greedy: the same text, and nothing else on stdout
    err = "\n".join(err)
    assert "acceptance" in err and "tokens/s" in err and "plain" in err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["mode"] == "speculative" and stats["draft_tokens"] == 1 and len(stats["acceptance_rate"]) == 1
    assert stats["new_tokens"] == 8 and stats["baseline_tokens_per_s"] > 0 and "speedup" in stats
    assert len(stats["expert_load"]) == 3  # main MoE layers and the MTP module's


def test_generation_stats_feed_dsv3_eplb_and_the_placement_keeps_the_output(checkpoint, tmp_path, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "for i in", "--max-tokens", "6", "--temperature", "0"]
    code, plain, _ = cli(argv + ["--stats", str(tmp_path / "s.json")], capsys)
    assert code == 0
    code, out, _ = cli(
        [
            "eplb",
            "--loads",
            str(tmp_path / "s.json"),
            "--replicas",
            "12",
            "--nodes",
            "2",
            "--gpus",
            "4",
            "--groups",
            "4",
            "--json",
            str(tmp_path / "placement.json"),
        ],
        capsys,
    )
    assert code == 0 and "after (refined)" in out
    code, replicated, _ = cli(argv + ["--placement", str(tmp_path / "placement.json")], capsys)
    assert code == 0 and replicated == plain


@pytest.mark.parametrize(
    "case",
    [
        "nan-temperature",
        "negative-temperature",
        "inf-temperature",
        "bad-top-p",
        "cuda",
        "bad-device",
        "max-tokens-context",
        "max-tokens-absurd",
        "max-tokens-zero",
        "max-tokens-float",
        "missing-tokenizer",
        "missing-prompts-file",
        "damaged-weights",
        "speculative-no-mtp",
        "bad-placement",
        "huge-seed",
        "bad-num-draft",
    ],
)
def test_generation_bad_input_one_line_exit_2(checkpoint, tmp_path, capsys, case):
    base = ["generate", str(checkpoint), "--prompt", "x", "--max-tokens", "3"]
    extra = {
        "nan-temperature": ["--temperature", "nan"],
        "negative-temperature": ["--temperature", "-1"],
        "inf-temperature": ["--temperature", "inf"],
        "bad-top-p": ["--top-p", "0"],
        "cuda": ["--device", "cuda"],
        "bad-device": ["--device", "tpu7"],
        "max-tokens-context": ["--max-tokens", "64"],
        "max-tokens-absurd": ["--max-tokens", "1000000000000"],
        "max-tokens-zero": ["--max-tokens", "0"],
        "max-tokens-float": ["--max-tokens", "2.5"],
        "missing-tokenizer": ["--tokenizer", str(tmp_path / "nope" / "tok.json")],
        "missing-prompts-file": ["--prompts-file", str(tmp_path / "nope.txt")],
        "bad-placement": ["--placement", str(checkpoint / "config.json")],
        "huge-seed": ["--seed", str(2**64)],
        "bad-num-draft": ["--speculative", "mtp", "--num-draft", "3"],
    }.get(case, [])
    path = checkpoint
    if case == "damaged-weights":
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(small_config(vocab_size=512))
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))
        path = tmp_path / "damaged"
        model.save_pretrained(path)
        shutil.copy(checkpoint / "tokenizer.json", path / "tokenizer.json")
    if case == "speculative-no-mtp":
        torch.manual_seed(0)
        path = tmp_path / "nomtp"
        DeepseekV3ForCausalLM(small_config(vocab_size=512, num_nextn_predict_layers=0)).save_pretrained(path)
        shutil.copy(checkpoint / "tokenizer.json", path / "tokenizer.json")
        extra = ["--speculative", "mtp"]
    if torch.cuda.is_available() and case == "cuda":
        pytest.skip("this machine has CUDA")
    base[1] = str(path)
    code, out, err = cli(base + extra, capsys)
    lines = [assert_one_error(code, err)]
    assert out == ""
    if case == "missing-tokenizer":
        assert str(tmp_path / "nope" / "tok.json") in lines[0]
    if case == "damaged-weights":
        assert "non-finite" in lines[0]
    if case == "cuda":
        assert "CUDA" in lines[0]
    if case.startswith("max-tokens-") and case != "max-tokens-float":
        assert "max-tokens" in lines[0] or "max_new_tokens" in lines[0] or "context" in lines[0]


def test_generation_error_in_a_fresh_process_has_no_traceback(checkpoint):
    import dsv3

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(dsv3.__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3", "generate", str(checkpoint), "--temperature", "nan"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.stdout == ""
    assert_one_error(proc.returncode, proc.stderr)

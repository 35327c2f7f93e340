"""Shared helpers for the tests: small random model configs, quick run options, the CLI and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from dsv3.config import ModelConfig

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def small_config(**changes) -> ModelConfig:
    """A DeepSeek-V3-style config of a few hundred thousand parameters (sigmoid, groups, MTP, YaRN)."""
    base = dict(
        model_type="deepseek_v3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        rope_theta=10000.0,
        rope_scaling=dict(YARN),
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    base.update(changes)
    return ModelConfig.from_dict(base)


def v2_config(**changes) -> ModelConfig:
    """A DeepSeek-V2-style config: softmax scoring, greedy top-k, no q compression, no MTP."""
    base = dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        num_nextn_predict_layers=0,
        n_shared_experts=2,
        num_experts_per_tok=3,
    )
    base.update(changes)
    return small_config(**base)


def quick_options(setup, run_dir, **changes):
    """TrainConfig options for a run of a few seconds."""
    opts = dict(
        model=setup["model"],
        data=setup["corpus"],
        tokenizer=setup["tokenizer"],
        seq_len=32,
        micro_batch=4,
        global_batch=8,
        steps=6,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        save_every=3,
        keep_last=5,
        sample_tokens=8,
        progress=False,
        tensorboard=False,
        run_dir=str(run_dir),
        val_fraction=0.05,
    )
    opts.update(changes)
    return opts


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def cli(argv, capsys):
    """Run ``dsv3 ARGV`` in this process (argparse exits caught); return (exit code, stdout, stderr lines)."""
    from dsv3.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors exit from the parser
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_one_error(code, err, *words):
    """Exit code 2 and exactly one ``dsv3: error:`` line (no traceback) containing ``words`` (case-insensitive).

    ``err``: stderr as a list of lines or as one string (``capsys.readouterr().err``, ``proc.stderr``); progress
    lines (``step ...``) are not errors. Returns the error line.
    """
    lines = [line for line in (err.splitlines() if isinstance(err, str) else err) if line.strip()]
    assert code == 2, lines
    errors = [line for line in lines if not line.startswith("step ")]
    assert len(errors) == 1, lines
    assert errors[0].startswith("dsv3: error: "), lines
    assert "Traceback" not in "\n".join(lines)
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return errors[0]

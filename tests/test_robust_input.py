"""Robustness, classes 1-3: the README's data examples work; every config.json field and integer flag is
checked; everything is validated before anything is written.

Each test drives ``dsv3`` as a user does and checks the exit code, that stderr holds one
``dsv3: error:`` line and no traceback, and which files are left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_error, cli
from robust_helpers import flags, mounted_tmpfs, run_dsv3, tiny_options, tree_digest

from dsv3.config import ModelConfig, as_int, load_preset
from dsv3.data.tokenizer import load_tokenizer
from dsv3.errors import ConfigError, DataError


# ============================================================== class 1: any text source trains a tokenizer
def _documents(setup):
    return [p.read_text(encoding="utf-8") for p in sorted(Path(setup["corpus"]).iterdir())]


def _check_trained_tokenizer(run_dir, setup):
    """The run's tokenizer was trained on the corpus: it fits the model and round-trips a document."""
    tok = load_tokenizer(run_dir / "tokenizer.json")
    assert 256 < tok.get_vocab_size() <= 512
    text = _documents(setup)[0]
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: exact round trip
    assert len(ids) < 0.6 * len(text.encode())  # it learned merges from the corpus


def test_folder_without_tokenizer_trains_and_caches_a_bpe(train_setup, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(["train", *flags(tiny_options(train_setup, run, tokenizer=None, progress=True))], capsys)
    assert code == 0, err
    _check_trained_tokenizer(run, train_setup)
    cached = list((Path(os.environ["DSV3_CACHE"]) / "tokenizers").glob("bpe-v512-*.json"))
    assert cached and any(c.read_bytes() == (run / "tokenizer.json").read_bytes() for c in cached)
    # class 8: the progress line names the LM loss next to the total loss, and val_loss says it is LM only
    progress = "\n".join(err)
    assert "loss " in progress and "(lm " in progress and "val_loss" in progress and "LM loss" in progress


def test_jsonl_without_tokenizer_trains_a_bpe(train_setup, tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(_documents(train_setup))))
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, tokenizer=None, data=data, steps=1))], capsys)
    assert code == 0, err
    _check_trained_tokenizer(run, train_setup)


def test_parquet_without_tokenizer_trains_a_bpe(train_setup, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": _documents(train_setup)}), data)
    run = tmp_path / "run"
    opts = tiny_options(train_setup, run, tokenizer=None, data=data, data_field="content", steps=1)
    code, _, err = cli(["train", *flags(opts)], capsys)
    assert code == 0, err
    _check_trained_tokenizer(run, train_setup)


def test_tokenizer_flag_accepts_a_checkpoint_directory(train_setup, tmp_path, capsys):
    ckpt = tmp_path / "hf-checkpoint"
    ckpt.mkdir()
    shutil.copy(train_setup["tokenizer"], ckpt / "tokenizer.json")
    shutil.copy(train_setup["model"], ckpt / "config.json")
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, tokenizer=ckpt, steps=1))], capsys)
    assert code == 0, err
    assert (run / "tokenizer.json").read_bytes() == Path(train_setup["tokenizer"]).read_bytes()


def test_tokenizer_from_vocab_and_merges_matches_the_tokenizer_json(train_setup, tmp_path):
    reference = load_tokenizer(train_setup["tokenizer"])
    gpt2_style = tmp_path / "gpt2-style"
    gpt2_style.mkdir()
    reference.model.save(str(gpt2_style))  # vocab.json + merges.txt
    tok = load_tokenizer(gpt2_style)
    text = _documents(train_setup)[1][:2000]
    assert tok.encode(text).ids == reference.encode(text).ids
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("case", ["missing", "dir-without-tokenizer"])
def test_bad_tokenizer_path_is_named(train_setup, tmp_path, capsys, case):
    path = tmp_path / "nowhere" / "tokenizer.json"
    if case == "dir-without-tokenizer":
        path = tmp_path / "empty-checkpoint"
        path.mkdir()
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, tokenizer=path))], capsys)
    assert_one_error(code, err, str(path))
    assert not run.exists()


# ============================================================== class 2: config.json fields
def _bad_config(tmp_path, case):
    cfg = json.loads(Path(load_preset_path()).read_text())
    path = tmp_path / "config.json"
    changes = {
        "string-rope-theta": {"rope_theta": "10000"},
        "bare-string-rope-scaling": {"rope_scaling": "yarn"},
        "rope-factor-string": {"rope_scaling": {"type": "yarn", "factor": "4"}},
        "unknown-rope-type": {"rope_scaling": {"type": "dynamic", "factor": 4}},
        "null-routed-scaling": {"routed_scaling_factor": None},
        "string-for-bool": {"norm_topk_prob": "true"},
        "int-for-bool": {"tie_word_embeddings": 1},
        "negative-initializer-range": {"initializer_range": -0.02},
        "absurd-vocab": {"vocab_size": 10**12},
        "float-vocab": {"vocab_size": 512.5},
        "string-layers": {"num_hidden_layers": "3"},
        "nan-eps": {"rms_norm_eps": float("nan")},
        "bool-hidden": {"hidden_size": True},
        "eos-beyond-vocab": {"eos_token_id": 10**6},
        "rope-parameters-list": {"rope_parameters": [1, 2]},
        "null-hidden-size": {"hidden_size": None},
    }
    if case == "non-utf8":
        path.write_bytes(b'{"model_type": "deepseek_v3", "hidden_act": "\xff\xfe"}')
        return path
    cfg.update(changes[case])
    path.write_text(json.dumps(cfg))
    return path


def load_preset_path():
    from importlib import resources

    return str(resources.files("dsv3") / "presets" / "tiny.json")


CONFIG_CASES = [
    "string-rope-theta",
    "bare-string-rope-scaling",
    "rope-factor-string",
    "unknown-rope-type",
    "null-routed-scaling",
    "string-for-bool",
    "int-for-bool",
    "negative-initializer-range",
    "absurd-vocab",
    "float-vocab",
    "string-layers",
    "nan-eps",
    "bool-hidden",
    "eos-beyond-vocab",
    "rope-parameters-list",
    "null-hidden-size",
    "non-utf8",
]
CONFIG_WORDS = {
    "string-rope-theta": "rope_theta",
    "bare-string-rope-scaling": "rope_scaling",
    "rope-factor-string": "factor",
    "unknown-rope-type": "rope",
    "null-routed-scaling": "routed_scaling",
    "string-for-bool": "norm_topk_prob",
    "int-for-bool": "tie_word_embeddings",
    "negative-initializer-range": "initializer_range",
    "absurd-vocab": "vocab_size",
    "float-vocab": "vocab_size",
    "string-layers": "num_hidden_layers",
    "nan-eps": "rms_norm_eps",
    "bool-hidden": "hidden_size",
    "eos-beyond-vocab": "eos_token_id",
    "rope-parameters-list": "rope_parameters",
    "null-hidden-size": "hidden_size",
    "non-utf8": "UTF-8",
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_every_config_field_is_type_and_range_checked(train_setup, tmp_path, capsys, case):
    bad = _bad_config(tmp_path, case)
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, model=bad))], capsys)
    assert_one_error(code, err, CONFIG_WORDS[case])
    assert not run.exists()
    with pytest.raises(ConfigError):  # the library API raises the same error
        ModelConfig.from_json_file(bad)


def test_absurd_vocab_never_reaches_the_tokenizer_trainer(train_setup, tmp_path):
    """Without --tokenizer a BPE would be trained with vocab_size V: a Rust abort (exit 134) before."""
    bad = _bad_config(tmp_path, "absurd-vocab")
    opts = tiny_options(train_setup, tmp_path / "run", model=bad, tokenizer=None)
    proc = run_dsv3(["train", *flags(opts)], timeout=120)
    assert_one_error(proc.returncode, proc.stderr)


def test_valid_configs_still_load():
    for name in ("tiny", "small", "deepseek-v3", "deepseek-v2-lite"):
        cfg = load_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the checks accept every shipped preset


@pytest.mark.parametrize(
    "flag,value",
    [("steps", "2.5"), ("seq-len", "16.5"), ("micro-batch", "two"), ("steps", "true"), ("save-every", "1e400")],
)
def test_integer_flags_reject_non_integers(train_setup, tmp_path, capsys, flag, value):
    run = tmp_path / "run"
    argv = ["train", *flags(tiny_options(train_setup, run)), f"--{flag}", value]
    code, _, err = cli(argv, capsys)
    assert_one_error(code, err, flag.replace("-", "_"))
    assert not run.exists()


def test_as_int_is_strict():
    assert [as_int(v, "x") for v in (3, "3", " 7 ", 3.0, "1e3", "-2")] == [3, 3, 7, 3, 1000, -2]
    for bad in (2.5, "2.5", "x", True, None, "", float("inf"), "nan", [3]):
        with pytest.raises(ConfigError, match="must be an integer"):
            as_int(bad, "x")


# ============================================================== class 3: validate before writing
@pytest.mark.parametrize(
    "bad",
    [
        {"beta1": 2.0},
        {"eps": -1.0},
        {"weight_decay": -1.0},
        {"min_lr": 1.0},
        {"warmup_steps": -3},
        {"decay_start": 2.0},
    ],
)
def test_failed_validation_leaves_no_run_directory(train_setup, tmp_path, capsys, bad):
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, **bad))], capsys)
    assert_one_error(code, err)
    assert not run.exists()


def test_retry_after_a_refused_run_succeeds(train_setup, tmp_path, capsys):
    run = tmp_path / "run"
    for bad in ({"beta1": 2.0}, {"eps": -1.0}, {"weight_decay": -1.0}):
        code, _, err = cli(["train", *flags(tiny_options(train_setup, run, **bad))], capsys)
        assert_one_error(code, err)
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, steps=1))], capsys)
    assert code == 0, err  # not "already holds a run"
    assert (run / "checkpoints" / "step-0000001").is_dir()


def test_run_dir_under_a_file(train_setup, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    code, _, err = cli(["train", *flags(tiny_options(train_setup, blocker / "run"))], capsys)
    assert_one_error(code, err, "a-file", "not a directory")
    assert blocker.read_text() == "keep me\n"


def test_unwritable_run_dir(train_setup, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see a read-only parent
        import dsv3.train.rundir as rundir

        real = os.access
        monkeypatch.setattr(
            rundir.os,
            "access",
            lambda p, mode, **kw: False if os.path.abspath(p) == str(parent) else real(p, mode, **kw),
        )
    else:
        parent.chmod(0o555)
    try:
        code, _, err = cli(["train", *flags(tiny_options(train_setup, parent / "run"))], capsys)
    finally:
        parent.chmod(0o755)
    assert_one_error(code, err, "not writable")
    assert os.listdir(parent) == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only filesystem (a read-only tmpfs; needs mount rights, else skipped)."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as path:
        yield path


def test_read_only_filesystem(train_setup, read_only_dir, capsys):
    code, _, err = cli(["train", *flags(tiny_options(train_setup, read_only_dir / "run"))], capsys)
    assert_one_error(code, err, "read-only")


def test_seq_len_beyond_the_context_is_refused(train_setup, tmp_path, capsys):
    run = tmp_path / "run"  # the test model has max_position_embeddings 256
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, seq_len=300))], capsys)
    assert_one_error(code, err, "max_position_embeddings", "256", "--rope-scaling yarn")
    assert not run.exists()


def test_model_too_large_for_memory_is_refused_before_allocation(train_setup, tmp_path, capsys):
    import time

    run = tmp_path / "run"
    start = time.perf_counter()
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, model="deepseek-v3", tokenizer=None))], capsys)
    line = assert_one_error(code, err, "planner estimate", "GiB", "memory")
    assert time.perf_counter() - start < 20  # refused from arithmetic, nothing allocated
    assert not run.exists()
    assert "11," in line or "TiB" in line or "GiB" in line


def test_memory_estimate_covers_weights_grads_and_moments():
    """Independent floor: FP32 weights + gradients + two FP32 AdamW moments = 16 bytes per parameter."""
    import torch

    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.train.preflight import check_memory, estimate_training_bytes

    cfg = load_preset("tiny")
    with torch.device("meta"):
        n = sum(p.numel() for p in DeepseekV3ForCausalLM(cfg).parameters())
    est = estimate_training_bytes(cfg, seq_len=64, micro_batch=2)
    assert 16 * n <= est <= 16 * n + 64 * 2**20  # plus activations of 2 x 64 tokens (a few MiB)
    with pytest.raises(ConfigError, match="planner estimate"):
        check_memory(cfg, device="cpu", seq_len=64, micro_batch=2, available=16 * n)
    assert check_memory(cfg, device="cpu", seq_len=64, micro_batch=2, available=2**40) == est


def test_data_errors_are_one_line(train_setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, data=bad, tokenizer=None))], capsys)
    assert_one_error(code, err, "line 2")
    assert not run.exists()
    with pytest.raises(DataError):
        from dsv3.data.sources import CorpusSpec
        from dsv3.data.tokenizer import tokenizer_for_data

        tokenizer_for_data(CorpusSpec(bad), vocab_size=512)


def test_existing_run_is_untouched_by_a_refused_start(train_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", *flags(tiny_options(train_setup, run, steps=1))], capsys)[0] == 0
    before = tree_digest(run)
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, steps=1))], capsys)
    assert_one_error(code, err, "already holds a run")
    assert tree_digest(run) == before

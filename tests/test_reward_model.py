"""The reward model: Bradley-Terry training on a synthetic preference set, saving/loading, RewardSet use, errors."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error, cli, small_config

from dsv3.errors import CheckpointError
from dsv3.train.config import load_train_config
from dsv3.train.reward_model import bradley_terry_loss, load_reward_model, train_reward_model
from dsv3.train.rewards import RewardSet


def _bench_module():
    """bench/reward_model.py, whose synthetic preference sets the test shares."""
    path = Path(__file__).resolve().parents[1] / "bench" / "reward_model.py"
    spec = importlib.util.spec_from_file_location("bench_reward_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digit_rule_pairs(n, seed):
    """Prompts "a+b="; chosen: the sum in digits only; rejected: the same with a letter inside (breaks the rule)."""
    return _bench_module().preference_pairs(n, seed, "digits")


def test_bradley_terry_loss_matches_formula():
    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    loss, acc = bradley_terry_loss(rc, rr)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc.tolist(), rr.tolist())) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in digit_rule_pairs(240, seed=0)))
    model = root / "config.json"
    small_config(vocab_size=512).save(model)
    config = load_train_config(
        None,
        dict(
            task="reward",
            data=str(data),
            model=str(model),
            seq_len=16,
            micro_batch=16,
            global_batch=16,
            steps=40,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=4,
            eval_every=20,
            val_fraction=0.25,
            progress=False,
            tensorboard=False,
            run_dir=str(root / "run"),
            seed=0,
        ),
    )
    result = train_reward_model(config, log=lambda line: None)
    return root, result


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_reward_model_learns_the_rule_and_loads(reward_run):
    root, result = reward_run
    assert result.val_accuracy > 0.9, result
    records = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < 0.1 < records[0]["loss"]  # from about log 2
    loaded = load_reward_model(result.run_dir)
    fresh = digit_rule_pairs(60, seed=1)  # pairs never seen in training
    chosen = loaded.score([p["prompt"] for p in fresh], [p["chosen"] for p in fresh])
    rejected = loaded.score([p["prompt"] for p in fresh], [p["rejected"] for p in fresh])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(fresh) > 0.9
    rs = RewardSet.from_specs(["math"], weights=[0.0], reward_model=result.run_dir)
    out = rs([fresh[0]["prompt"]] * 2, [fresh[0]["chosen"], fresh[0]["rejected"]], {"answer": [None, None]})
    assert rs.names == ["math", "reward_model"]
    assert out.total.tolist() == pytest.approx([chosen[0], rejected[0]], abs=1e-5)


def test_reward_model_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="holds no reward model"):
        load_reward_model(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    code, _, err = cli(
        ["train", "--task", "reward", "--data", bad, "--run-dir", tmp_path / "r", "--no-progress"], capsys
    )
    assert_one_error(code, err, "'rejected'", "line 1")
    code, _, err = cli(["train", "--task", "reward", "--data", bad, "--run-dir", tmp_path / "r2", "--ep", "2"], capsys)
    assert_one_error(code, err, "one process")


@pytest.mark.timeout(120)
def test_reward_task_from_the_cli(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in digit_rule_pairs(24, seed=2)))
    small_config(vocab_size=512).save(tmp_path / "config.json")
    code, out, err = cli(
        [
            "train",
            "--task",
            "reward",
            "--data",
            data,
            "--model",
            tmp_path / "config.json",
            "--seq-len",
            16,
            "--micro-batch",
            4,
            "--global-batch",
            8,
            "--steps",
            2,
            "--warmup-steps",
            1,
            "--eval-every",
            2,
            "--val-fraction",
            0.25,
            "--run-dir",
            tmp_path / "run",
            "--no-progress",
            "--no-tensorboard",
        ],
        capsys,
    )
    assert code == 0, err
    assert "held-out pairwise accuracy" in out and "--reward-model" in out
    assert load_reward_model(str(tmp_path / "run")).score(["1+1="], ["2"])[0] == pytest.approx(
        load_reward_model(str(tmp_path / "run" / "reward_model")).score(["1+1="], ["2"])[0]
    )
    code, _, err = cli(["train", "--resume", tmp_path / "run"], capsys)
    assert_one_error(code, err, "cannot be resumed")


def _load_bench(name):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grpo_with_the_reward_model_raises_the_rule_rate(tmp_path):
    """bench/grpo_reward_model.py, small: a reward model taught "the answer ends in an even digit" steers GRPO."""
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.train.config import TrainConfig
    from dsv3.train.grpo_run import train_grpo
    from dsv3.train.rl_eval import evaluate_prompts

    toy, bench = _load_bench("grpo_toy"), _load_bench("grpo_reward_model")
    train_pairs, held_out = toy.addition_split(0, held_out=40)
    model = DeepseekV3ForCausalLM(toy.toy_config())
    model.reset_parameters(0)  # an untrained policy: it ends in an even digit only by chance
    init = toy.save_checkpoint_dir(model, toy.char_tokenizer(), str(tmp_path / "init"))
    rm_dir, rm_accuracy = bench.train_rule_reward_model(str(tmp_path), init, train_pairs, 0, log=lambda line: None)
    assert rm_accuracy > 0.9
    held = toy.write_prompts(str(tmp_path / "held.jsonl"), held_out)
    rate = lambda path: evaluate_prompts(path, held, [bench.RULE], samples=4, max_new_tokens=4).mean_reward  # noqa
    before = rate(init)
    options = toy.grpo_options(
        init,
        toy.write_prompts(str(tmp_path / "train.jsonl"), train_pairs),
        str(tmp_path / "grpo"),
        steps=40,
        reward=None,
        reward_model=rm_dir,
        lr=2e-3,
        min_lr=2e-3,
    )
    train_grpo(TrainConfig.from_dict(options), log=lambda line: None)
    after = rate(str(tmp_path / "grpo"))
    assert after > before + 0.2, (before, after)


def test_pairs_render_through_the_chat_template_when_there_is_one(tmp_path):
    from dsv3.data.chat import ChatTemplate
    from dsv3.train.reward_model import _template_for, render

    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert render("1+1=", "2", None) == "1+1=2"
    assert (
        render("1+1=", "2", ChatTemplate(chatml))
        == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml, "eos_token": "<|im_end|>"}))
    with_template = load_train_config(None, dict(task="reward", init_from=str(tmp_path)))
    assert _template_for(with_template).source == chatml
    assert _template_for(load_train_config(None, dict(task="reward"))) is None

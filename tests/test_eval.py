"""dsv3 eval: token-weighted loss against float64 by hand (text and chat data), the passkey probe,
and the command line (one line and exit 2 on bad input)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error, cli, small_config

from dsv3.cli import main
from dsv3.errors import ConfigError
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.train.evaluation import (
    PasskeySample,
    evaluate_checkpoint,
    evaluate_loss,
    is_chat_file,
    parse_lengths,
    passkey_retrieved,
    passkey_sample,
    passkey_samples,
)

DATA = Path(__file__).parent / "data"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, train_setup):
    """A saved random model with a tokenizer.json and a ChatML tokenizer_config.json."""
    from dsv3.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config(vocab_size=512, rope_scaling=None, max_position_embeddings=256))
    model.save_pretrained(root / "ckpt")
    tok = load_tokenizer(train_setup["tokenizer"])
    tok.save(str(root / "ckpt" / "tokenizer.json"))
    (root / "ckpt" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|eos|>"}))
    return root / "ckpt", model.eval(), tok


def float64_loss(model, ids, labels):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    keep = labels != -100
    return -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item(), int(keep.sum())


def test_evaluate_loss_is_the_token_weighted_mean(ckpt):
    _, model, _ = ckpt
    g = torch.Generator().manual_seed(0)
    b1 = (torch.randint(0, 512, (2, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g))
    b2 = (torch.randint(0, 512, (1, 16), generator=g), torch.randint(0, 512, (1, 16), generator=g))
    b2[1][0, :10] = -100
    got = evaluate_loss(model, [b1, b2])
    (s1, n1), (s2, n2) = float64_loss(model, *b1), float64_loss(model, *b2)
    assert got.tokens == n1 + n2 == 38 and got.sequences == 3
    assert got.loss == pytest.approx((s1 + s2) / (n1 + n2), rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.loss))


def test_text_data_loss_matches_by_hand(ckpt, tmp_path):
    path, model, tok = ckpt
    text = (Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py").read_text()[:3000]
    (tmp_path / "held.txt").write_text(text)
    report = evaluate_checkpoint(str(path), data=str(tmp_path / "held.txt"), seq_len=64, batch_size=3)
    ids = tok.encode(text).ids + [tok.token_to_id("<|eos|>")]
    n = (len(ids) - 1) // 64
    total, count = 0.0, 0
    for i in range(n):
        window = torch.tensor([ids[i * 64 : i * 64 + 65]])
        s, c = float64_loss(model, window[:, :-1], window[:, 1:])
        total, count = total + s, count + c
    assert report.kind == "text" and report.loss.tokens == count
    assert report.loss.loss == pytest.approx(total / count, rel=1e-5)
    assert "perplexity" in report.lines()[1]


def test_chat_data_is_scored_on_assistant_tokens(ckpt, tmp_path):
    path, model, tok = ckpt
    records = [
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"prompt": "count", "completion": "one two three"},
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert is_chat_file(f) and not is_chat_file(Path(__file__))
    report = evaluate_checkpoint(str(path), data=str(f), seq_len=64)
    total, count = 0.0, 0
    for r in records:
        msgs = r.get("messages") or [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]
        prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs[:-1])
        prompt += "<|im_start|>assistant\n"
        answer = msgs[-1]["content"] + "<|im_end|>"
        p_ids = tok.encode(prompt).ids
        a_ids = tok.encode(answer).ids
        nl = tok.encode("\n").ids
        ids = torch.tensor([p_ids + a_ids + nl])
        labels = torch.tensor([[-100] * (len(p_ids) - 1) + a_ids + [-100] * len(nl)])
        s, c = float64_loss(model, ids[:, :-1], labels)
        total, count = total + s, count + c
    assert report.kind == "chat" and report.loss.tokens == count
    assert report.loss.loss == pytest.approx(total / count, rel=1e-5)


def test_passkey_sample_layout(ckpt):
    _, _, tok = ckpt
    s = passkey_sample(tok, 300, key="12345", depth=0.5)
    text = tok.decode(s.ids)
    assert abs(len(s.ids) - 300) <= len(
        tok.encode("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n").ids
    )
    assert text.endswith("What is the pass key? The pass key is 12345")
    assert s.ids[-len(s.answer) :] == s.answer == tok.encode(" 12345").ids
    assert text.count("The pass key is 12345. Remember it.") == 1
    first = passkey_sample(tok, 300, key="12345", depth=0.0)
    assert tok.decode(first.ids).index("12345") < text.index("12345")
    keys = [x.key for x in passkey_samples(tok, 200, 5, seed=1)]
    assert len(set(keys)) == 5 and keys == [x.key for x in passkey_samples(tok, 200, 5, seed=1)]


class Oracle(torch.nn.Module):
    """Predicts the next token of a fixed sequence (optionally with one answer token wrong)."""

    def __init__(self, full, vocab, wrong_at=None):
        super().__init__()
        self.full, self.vocab, self.wrong_at = list(full), vocab, wrong_at

    def forward(self, ids):
        t = ids.shape[1]
        nxt = torch.tensor(self.full[1 : t + 1])
        if self.wrong_at is not None:
            nxt[self.wrong_at] = (nxt[self.wrong_at] + 1) % self.vocab
        return type("O", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float().unsqueeze(0)})()


def test_passkey_retrieved_is_greedy_decoding_of_the_key():
    s = PasskeySample(ids=[5, 6, 7, 8, 9, 3, 4], answer=[3, 4], key="34", depth=0.0)
    assert passkey_retrieved(Oracle(s.ids, 16), [s]) == [True]
    assert passkey_retrieved(Oracle(s.ids, 16, wrong_at=-1), [s]) == [False]
    assert passkey_retrieved(Oracle(s.ids, 16, wrong_at=-3), [s]) == [True]  # a prompt token: not scored


def test_parse_lengths():
    assert parse_lengths("512, 1k,2048") == [512, 1024, 2048]
    for bad in ("", "abc", "8"):
        with pytest.raises(ConfigError):
            parse_lengths(bad)


def test_cli_eval_reports_loss_and_passkey(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    (tmp_path / "held.txt").write_text(Path(__file__).read_text()[:2000])
    assert (
        main(
            [
                "eval",
                str(path),
                "--data",
                str(tmp_path / "held.txt"),
                "--seq-len",
                "64",
                "--passkey",
                "64,128",
                "--passkey-trials",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "perplexity" in out and "passkey at 64 tokens:" in out and "passkey at 128 tokens:" in out


@pytest.mark.parametrize(
    "records, fragment",
    [
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}'], 'no "content"'),
        (['{"messages": [{"role": "user", "content": "only a question"}]}'], "no usable conversation"),
        (['{"messages": "hello"}'], "must be a list"),
    ],
)
def test_bad_chat_data_is_one_line_and_exit_2(ckpt, tmp_path, records, fragment):
    path, _, _ = ckpt
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(records) + "\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3", "eval", str(path), "--data", str(f), "--seq-len", "64"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert_one_error(proc.returncode, proc.stderr, fragment)


def test_cli_eval_needs_something_to_do(ckpt, capsys):
    path, _, _ = ckpt
    code, _, err = cli(["eval", str(path)], capsys)
    assert assert_one_error(code, err).startswith("dsv3: error: nothing to evaluate")

"""SFT data: chat templates rendered as transformers renders them, exact assistant loss masks,
document-masked packing that isolates conversations, bad data refused or counted."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_error, cli, small_config
from tokenizers import Tokenizer

from dsv3.data.chat import ChatTemplate, load_chat_template, read_conversations, token_mask, tokenize_conversation
from dsv3.data.packing import Conversation, PackedChatDataset, pack
from dsv3.data.sft import build_sft_data
from dsv3.errors import ConfigError, DataError
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.mla import document_mask

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DS_SPECIAL = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁outputs▁end｜>",
    "<|im_start|>",
    "<|im_end|>",
)

# A ChatML template with generation markers around the assistant content and its end-of-turn token.
CHATML_GEN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another one, please"},
        {"role": "assistant", "content": " green  and\nred "},
    ],
    [
        {"role": "system", "content": "First rule."},
        {"role": "system", "content": "Second rule."},
        {"role": "user", "content": "def f(x): return x"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "¿Qué? 日本語"},
        {"role": "assistant", "content": "Ünïcödé ✓ answer"},
    ],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE with DeepSeek-V3's chat special tokens (ids 0..14)."""
    from dsv3.data.tokenizer import train_bpe_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / n for n in ("textwrap.py", "shlex.py", "bisect.py") if (stdlib / n).is_file()]
    return train_bpe_tokenizer(files, 600, special_tokens=DS_SPECIAL)


@pytest.fixture(scope="module")
def ds_config():
    return json.loads((DATA / "deepseek_v3" / "tokenizer_config.json").read_text(encoding="utf-8"))


def hf_tokenizer(tok, template, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)


def ds_template(ds_config) -> ChatTemplate:
    return load_chat_template(DATA / "deepseek_v3" / "tokenizer_config.json")


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_deepseek_v3_template_renders_as_transformers(tok, ds_config, i, gen):
    messages = CONVERSATIONS[i] if not gen else CONVERSATIONS[i][:-1]
    ours, _ = ds_template(ds_config).render(messages, add_generation_prompt=gen)
    hf = hf_tokenizer(tok, ds_config["chat_template"], bos_token=BOS, eos_token=EOS)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_template_sees_raise_exception_and_tojson():
    t = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages | tojson }}"
    )
    assert t.render([{"role": "user", "content": "<a&b>"}])[0] == '[{"role": "user", "content": "<a&b>"}]'
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="user first"):
        t.render([{"role": "assistant", "content": "x"}])


# --------------------------------------------------------------------------- loss masks


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_mask_equals_transformers_on_generation_markers(tok, i):
    messages = CONVERSATIONS[i]
    conv = tokenize_conversation(messages, ChatTemplate(CHATML_GEN), tok)
    hf = hf_tokenizer(tok, CHATML_GEN)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert conv.ids.tolist() == list(out["input_ids"])
    assert conv.mask.astype(int).tolist() == list(out["assistant_masks"])
    assert conv.mask.any()


def _ds_with_markers(source: str) -> str:
    """DeepSeek-V3's template with {% generation %} around assistant content + end-of-turn token."""
    plain = "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    marked = "{{'<｜Assistant｜>'}}{% generation %}{{message['content'] + '<｜end▁of▁sentence｜>'}}{% endgeneration %}"
    assert source.count(plain) == 1
    return source.replace(plain, marked)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_deepseek_v3_prefix_mask_equals_transformers_marker_mask(tok, ds_config, i):
    """Without markers the spans come from rendering prefixes; they equal what transformers
    marks on the same template with markers added around content + end-of-turn token."""
    messages = CONVERSATIONS[i]
    conv = tokenize_conversation(messages, ds_template(ds_config), tok)
    hf = hf_tokenizer(tok, _ds_with_markers(ds_config["chat_template"]), bos_token=BOS, eos_token=EOS)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert conv.ids.tolist() == list(out["input_ids"])
    assert conv.mask.astype(int).tolist() == list(out["assistant_masks"])


def test_deepseek_v3_mask_by_hand(tok, ds_config):
    """The rendered pieces encoded one by one: only assistant content and <｜end▁of▁sentence｜> are marked."""
    messages = CONVERSATIONS[1]
    conv = tokenize_conversation(messages, ds_template(ds_config), tok)

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    pieces = [
        (BOS, 0),
        ("You are terse.", 0),
        (USER, 0),
        ("Name a colour.", 0),
        (ASSISTANT, 0),
        ("Blue", 1),
        (EOS, 1),
        (USER, 0),
        ("Another one, please", 0),
        (ASSISTANT, 0),
        (" green  and\nred ", 1),
        (EOS, 1),
    ]
    ids = [i for text, _ in pieces for i in enc(text)]
    mask = [m for text, m in pieces for _ in enc(text)]
    assert conv.ids.tolist() == ids
    assert conv.mask.astype(int).tolist() == mask
    eos = tok.token_to_id(EOS)
    assert conv.ids[conv.mask].tolist().count(eos) == 2
    assert tok.token_to_id(ASSISTANT) not in conv.ids[conv.mask].tolist()


def test_token_mask_overlap_rule():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)]
    assert token_mask(offsets, [(3, 6)]).tolist() == [False, True, True, False, False, False]
    assert token_mask(offsets, [(0, 1), (9, 10)]).tolist() == [True, False, False, False, False, True]
    assert not token_mask(offsets, []).any()


def test_prefix_method_refuses_a_template_that_rewrites_history(tok):
    # The last assistant turn is rendered differently from earlier ones: no prefix-stable spans.
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="continuation"):
        t.assistant_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


# --------------------------------------------------------------------------- reading data


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_completion_is_a_user_assistant_pair(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "Hello"}, {"messages": CONVERSATIONS[1]}])
    convs = [m for _, m in read_conversations(p)]
    assert convs[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert convs[1] == CONVERSATIONS[1]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("not json", "not valid JSON"),
        ('{"text": "plain"}', "neither"),
        ('{"messages": "hi"}', "must be a list"),
        ('{"messages": [{"content": "x"}]}', 'string \\"role\\"'),
        ('{"messages": [{"role": "user", "content": 3}]}', "is a int"),
    ],
)
def test_malformed_records_are_one_line_errors(tmp_path, line, fragment):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2") as info:
        list(read_conversations(p))
    assert fragment.replace("\\", "") in str(info.value) and "\n" not in str(info.value)


def test_missing_template_is_an_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}', encoding="utf-8")
    with pytest.raises(DataError, match="no chat template"):
        load_chat_template(tokenizer_dir=tmp_path)
    with pytest.raises(DataError, match="needs a chat template"):
        load_chat_template()
    with pytest.raises(DataError, match="does not exist"):
        load_chat_template(tmp_path / "nope.jinja")


def test_template_override_takes_tokens_from_the_checkpoint(tmp_path, ds_config):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ds_config), encoding="utf-8")
    (tmp_path / "t.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", encoding="utf-8"
    )
    t = load_chat_template(tmp_path / "t.jinja", tokenizer_dir=tmp_path)
    assert t.render([{"role": "user", "content": "x"}])[0] == BOS + "x" + EOS
    assert load_chat_template(tokenizer_dir=tmp_path).source == ds_config["chat_template"]


# --------------------------------------------------------------------------- packing


def test_pack_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300).tolist()
    rows = pack(lengths, 64)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= sum(lengths) / 64 * 1.25 + 1  # best-fit decreasing stays near the bound
    assert rows == pack(lengths, 64)  # deterministic
    assert pack([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError):
        pack([9], 8)


def test_document_mask_formula():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    m = document_mask(seg)
    assert m.shape == (2, 1, 6, 6)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(m[b, 0, i, j]) == (j <= i and seg[b, i] == seg[b, j])


def _conv(ids, mask):
    return Conversation(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))


def test_packed_rows_hold_shifted_masked_targets():
    a = _conv([1, 2, 3, 4], [0, 0, 1, 1])
    b = _conv([5, 6, 7], [0, 1, 1])
    ds = PackedChatDataset([a, b], 8, pad_id=9)
    assert len(ds) == 1 and ds.num_tokens == 4
    batch = ds.batch([0])
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 9, 9, 9]]
    assert batch.labels.tolist() == [[-100, 3, 4, 6, 7, -100, -100, -100]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert int(batch.loss_tokens) == 4
    unpacked = PackedChatDataset([a, b], 8, pad_id=9, packing=False)
    assert len(unpacked) == 2
    ub = unpacked.batch([1])
    assert ub.segment_ids is None and ub.position_ids is None
    assert ub.input_ids.tolist() == [[5, 6, 9, 9, 9, 9, 9, 9]] and ub.labels.tolist()[0][:3] == [6, 7, -100]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    records = []
    for k in range(24):
        turns = [{"role": "system", "content": "Be brief."}] if k % 3 == 0 else []
        for _ in range(1 + k % 2):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(2, 8)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 10)))})
        records.append(
            {"messages": turns} if k % 4 else {"prompt": turns[-2]["content"], "completion": turns[-1]["content"]}
        )
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", records)


def test_packed_conversations_get_the_logits_and_losses_they_get_alone(tok, ds_config, chat_file):
    torch.manual_seed(0)
    cfg = small_config(vocab_size=600, max_position_embeddings=512, rope_scaling=None)
    model = DeepseekV3ForCausalLM(cfg).eval()
    data = build_sft_data(chat_file, tokenizer=tok, template=ds_template(ds_config), seq_len=160, vocab_size=600)
    ds = data.train
    multi = [r for r in range(len(ds)) if len(ds.rows[r]) >= 3]
    assert multi, "the test needs rows that pack three or more conversations"
    batch = ds.batch(multi[:2])
    with torch.no_grad():
        packed = model(batch.input_ids, **batch.model_kwargs()).logits
        out = model(batch.input_ids, batch.labels, return_logits=True, **batch.model_kwargs())
    lm_sum, lm_n, mtp_sum, mtp_n = 0.0, 0, 0.0, 0
    for b, r in enumerate(multi[:2]):
        at = 0
        for c in ds.rows[r]:
            conv = ds.conversations[c]
            n = conv.positions
            ids = torch.from_numpy(conv.ids[:-1]).unsqueeze(0)
            labels = torch.from_numpy(np.where(conv.mask[1:], conv.ids[1:], -100)).unsqueeze(0)
            with torch.no_grad():
                alone = model(ids, labels, return_logits=True)
            torch.testing.assert_close(packed[b, at : at + n], alone.logits[0], atol=2e-5, rtol=1e-5)
            k_lm, k_mtp = int((labels != -100).sum()), int((labels[:, 1:] != -100).sum())
            lm_sum += float(alone.lm_loss) * k_lm
            lm_n += k_lm
            mtp_sum += float(alone.mtp_loss) * k_mtp
            mtp_n += k_mtp
            at += n
    assert lm_n == int(batch.loss_tokens)
    assert float(out.lm_loss) == pytest.approx(lm_sum / lm_n, rel=1e-5)
    assert float(out.mtp_loss) == pytest.approx(mtp_sum / mtp_n, rel=1e-5)


def test_one_segment_equals_no_mask():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config()).eval()
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, segment_ids=torch.ones_like(ids), position_ids=torch.arange(24).expand(2, 24)).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_masked_packing_trains_the_same_gradients_as_separate_runs(tok, ds_config, chat_file):
    """Backward through the document mask: the packed loss gradient equals the token-weighted sum
    of the separate conversations' gradients."""
    torch.manual_seed(0)
    cfg = small_config(vocab_size=600, max_position_embeddings=512, rope_scaling=None, num_nextn_predict_layers=0)
    model = DeepseekV3ForCausalLM(cfg)
    data = build_sft_data(chat_file, tokenizer=tok, template=ds_template(ds_config), seq_len=160, vocab_size=600)
    r = max(range(len(data.train)), key=lambda i: len(data.train.rows[i]))
    batch = data.train.batch([r])
    out = model(batch.input_ids, batch.labels, **batch.model_kwargs())
    (out.lm_loss * int(batch.loss_tokens)).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for c in data.train.rows[r]:
        conv = data.train.conversations[c]
        ids = torch.from_numpy(conv.ids[:-1]).unsqueeze(0)
        labels = torch.from_numpy(np.where(conv.mask[1:], conv.ids[1:], -100)).unsqueeze(0)
        alone = model(ids, labels)
        (alone.lm_loss * int((labels != -100).sum())).backward()
    w = model.model.layers[0].self_attn.kv_b_proj.weight
    torch.testing.assert_close(packed["model.layers.0.self_attn.kv_b_proj.weight"], w.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        packed["model.embed_tokens.weight"], model.model.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------------- the data object


def test_sft_data_interface_split_and_resume(tok, ds_config, chat_file):
    data = build_sft_data(
        chat_file,
        tokenizer=tok,
        template=ds_template(ds_config),
        seq_len=160,
        vocab_size=600,
        val_fraction=0.2,
        split_seed=3,
    )
    assert data.stats.read == 24 and data.stats.kept == 24
    assert len(data.val.conversations) == 5 and len(data.train.conversations) == 19
    assert "24 of 24 conversations" in data.summary()
    loader = data.loader(seed=7)
    loader.next_batch(2)
    state = loader.state_dict()
    expected = [loader.next_batch(2) for _ in range(len(data.train))]
    again = data.loader(seed=7)
    again.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = again.next_batch(2)
        for name in ("input_ids", "labels", "segment_ids", "position_ids"):
            assert torch.equal(getattr(got, name), getattr(want, name))
    vb = list(data.val_batches(2))
    assert sum(b.input_ids.shape[0] for b in vb) == len(data.val)
    assert data.steps_for_epochs(2, 4) == -(-2 * len(data.train) // 4)
    with pytest.raises(ConfigError):
        data.steps_for_epochs(0, 4)


def test_long_and_assistantless_conversations_are_skipped_truncated_or_refused(tok, ds_config, tmp_path):
    long_text = " ".join(["word"] * 200)
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "hi", "completion": "hello"},
            {"prompt": "tell me", "completion": long_text},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"prompt": long_text, "completion": "late answer"},
        ],
    )
    t = ds_template(ds_config)
    skipped = build_sft_data(p, tokenizer=tok, template=t, seq_len=32, vocab_size=600, on_long="skip")
    assert (skipped.stats.kept, skipped.stats.too_long, skipped.stats.no_assistant) == (1, 2, 1)
    assert "2 skipped as longer than seq_len" in skipped.summary()
    assert "1 skipped without an assistant turn" in skipped.summary()
    cut = build_sft_data(p, tokenizer=tok, template=t, seq_len=32, vocab_size=600, on_long="truncate")
    # the long answer is cut to 33 tokens; the long prompt leaves no assistant token, so it is skipped
    assert (cut.stats.kept, cut.stats.truncated, cut.stats.too_long) == (2, 1, 1)
    assert max(len(c.ids) for c in cut.train.conversations) == 33
    with pytest.raises(DataError, match="line 2 of .* more than seq_len") as info:
        build_sft_data(p, tokenizer=tok, template=t, seq_len=32, vocab_size=600, on_long="error")
    assert "\n" not in str(info.value)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no usable conversation"):
        build_sft_data(only_bad, tokenizer=tok, template=t, seq_len=32, vocab_size=600)
    with pytest.raises(DataError, match="no assistant turn"):
        build_sft_data(only_bad, tokenizer=tok, template=t, seq_len=32, vocab_size=600, on_long="error")
    with pytest.raises(ConfigError):
        build_sft_data(p, tokenizer=tok, template=t, seq_len=32, vocab_size=600, on_long="drop")
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        build_sft_data(p, tokenizer=tok, template=t, seq_len=64, vocab_size=100)


def test_template_refusal_is_one_line(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "assistant", "content": "first"}]}])
    t = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with "
        "the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        origin="t.jinja",
    )
    with pytest.raises(DataError, match="refuses line 1 .* start with the user"):
        build_sft_data(p, tokenizer=tok, template=t, seq_len=32, vocab_size=600)


# --------------------------------------------------------------------------- training runs (dsv3 train --task sft)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A small Hugging Face checkpoint directory with DeepSeek-V3's chat template and a tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(small_config(vocab_size=600, rope_scaling=None, max_position_embeddings=256)).save_pretrained(
        root
    )
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text((DATA / "deepseek_v3" / "tokenizer_config.json").read_text())
    return root


def sft_options(hf_dir, chat_file, run_dir, **changes):
    opts = dict(
        init_from=str(hf_dir),
        data=str(chat_file),
        task="sft",
        seq_len=160,
        micro_batch=2,
        global_batch=4,
        steps=6,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=1,
        eval_every=3,
        eval_batches=2,
        save_every=3,
        keep_last=5,
        sample_tokens=4,
        progress=False,
        tensorboard=False,
        run_dir=str(run_dir),
        val_fraction=0.1,
    )
    opts.update(changes)
    return opts


def _run(opts, **kw):
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import train

    return train(TrainConfig.from_dict(opts), log=lambda s: None, **kw)


def _metrics(run_dir):
    return [
        json.loads(line)
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "loss" in json.loads(line)
    ]


@pytest.mark.timeout(600)
def test_sft_run_resumes_bit_exactly_and_logs_loss_tokens(hf_dir, chat_file, tmp_path):
    from dsv3.checkpoint.state import latest_checkpoint, list_checkpoints
    from dsv3.train.loop import train

    _run(sft_options(hf_dir, chat_file, tmp_path / "straight"))

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        _run(sft_options(hf_dir, chat_file, tmp_path / "resumed"), step_hook=stop_at_3)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "resumed"))] == [3]
    assert train(None, resume=str(tmp_path / "resumed"), log=lambda s: None).step == 6
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "loss_tokens", "lr"):
            assert a[key] == b[key], (a["step"], key)  # bit for bit
    import dsv3

    w1 = dsv3.from_pretrained(latest_checkpoint(str(tmp_path / "straight"))).state_dict()
    w2 = dsv3.from_pretrained(latest_checkpoint(str(tmp_path / "resumed"))).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # loss tokens: the assistant targets of the step's rows, far fewer than its positions
    data = build_sft_data(
        chat_file,
        tokenizer=Tokenizer.from_file(str(hf_dir / "tokenizer.json")),
        template=load_chat_template(tokenizer_dir=hf_dir),
        seq_len=160,
        vocab_size=600,
        val_fraction=0.1,
        split_seed=0,
    )
    loader = data.loader(0)
    for r in straight:
        want = sum(int(loader.next_batch(2).loss_tokens) for _ in range(2))
        assert r["loss_tokens"] == want and 0 < want < 4 * 160
    assert any("val_loss" in r for r in straight)
    assert (tmp_path / "straight" / "tokenizer_config.json").is_file()  # the run's template copy


def test_sft_step_loss_is_token_weighted_over_micro_batches(hf_dir, chat_file, tmp_path):
    """With micro-batches of different numbers of assistant tokens the step's loss is the mean over all of
    them: the same as one micro-batch holding all rows (global 4 = micro 4 vs 2 x micro 2)."""
    _run(
        sft_options(
            hf_dir, chat_file, tmp_path / "one", micro_batch=4, steps=1, eval_every=100, save_every=100, sample_tokens=0
        )
    )
    _run(
        sft_options(
            hf_dir, chat_file, tmp_path / "two", micro_batch=2, steps=1, eval_every=100, save_every=100, sample_tokens=0
        )
    )
    one, two = _metrics(tmp_path / "one")[0], _metrics(tmp_path / "two")[0]
    assert one["loss_tokens"] == two["loss_tokens"]
    assert two["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_epochs_set_the_steps(hf_dir, chat_file, tmp_path):
    result = _run(
        sft_options(
            hf_dir,
            chat_file,
            tmp_path / "ep",
            epochs=2,
            steps=1000,
            eval_every=100,
            save_every=100,
            sample_tokens=0,
            packing=False,
            val_fraction=0.0,
        )
    )
    assert result.step == 2 * 24 // 4  # 24 conversations, one per row, 4 rows a step


def test_yarn_extension_run_writes_the_official_rope_scaling(hf_dir, chat_file, tmp_path):
    _run(
        sft_options(
            hf_dir,
            chat_file,
            tmp_path / "yarn",
            rope_scaling="yarn",
            rope_factor=4,
            seq_len=512,
            steps=1,
            eval_every=100,
            save_every=100,
            sample_tokens=0,
        )
    )
    from dsv3.checkpoint.state import latest_checkpoint

    for path in (
        tmp_path / "yarn" / "model_config.json",
        Path(latest_checkpoint(str(tmp_path / "yarn"))) / "config.json",
    ):
        cfg = json.loads(path.read_text())
        assert cfg["rope_scaling"] == {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 256,
            "type": "yarn",
        }
        assert cfg["max_position_embeddings"] == 1024
    # the run's checkpoint loads in transformers with the same logits beyond the original 256 positions
    import warnings

    import dsv3

    ckpt = latest_checkpoint(str(tmp_path / "yarn"))
    ours = dsv3.from_pretrained(ckpt).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 600, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits[:, 256:] - theirs(ids).logits[:, 256:]).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"messages": [{"role": "user", "content": "unanswered"}]}, "no assistant turn"),
        ({"messages": [{"role": "user"}]}, 'no "content"'),
        ({"prompt": "a " * 400, "completion": "b"}, "more than seq_len"),
    ],
)
def test_bad_chat_data_in_training_is_one_line_exit_2(hf_dir, tmp_path, capsys, record, fragment):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "ok"}] * 8 + [record])
    code, _, err = cli(
        [
            "train",
            "--init-from",
            str(hf_dir),
            "--task",
            "sft",
            "--data",
            str(f),
            "--seq-len",
            "64",
            "--on-long",
            "error",
            "--micro-batch",
            "1",
            "--global-batch",
            "1",
            "--steps",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
            "--progress",
            "false",
        ],
        capsys,
    )
    assert_one_error(code, err, fragment)
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_template_in_training_is_one_line_exit_2(hf_dir, chat_file, tmp_path, capsys):
    import shutil

    from dsv3.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer_config.json").unlink()
    code = main(
        [
            "train",
            "--init-from",
            str(bare),
            "--task",
            "sft",
            "--data",
            str(chat_file),
            "--steps",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
            "--progress",
            "false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no chat template" in err[0], err


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_document_mask_survives_recomputation(policy):
    """Recomputed blocks (and MTP modules) get the document mask too: same loss and gradients as without."""
    from dsv3.memory.recompute import apply_recompute

    torch.manual_seed(0)
    plain = DeepseekV3ForCausalLM(small_config())
    recomputed = DeepseekV3ForCausalLM(small_config())
    recomputed.load_state_dict(plain.state_dict())
    apply_recompute(recomputed, policy)
    ids = torch.randint(0, 512, (2, 24))
    seg = torch.tensor([[1] * 10 + [2] * 14, [1] * 5 + [2] * 7 + [3] * 12])
    pos = torch.cat([torch.cat([torch.arange(int((s == k).sum())) for k in s.unique()]).unsqueeze(0) for s in seg])
    labels = torch.randint(0, 512, (2, 24))
    losses = []
    for m in (plain, recomputed):
        out = m(ids, labels, segment_ids=seg, position_ids=pos)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for (n, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
    # and the mask matters: without it the loss differs
    assert not torch.allclose(plain(ids, labels).loss, losses[0])

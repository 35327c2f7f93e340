"""MTP speculative decoding: greedy equality with plain decoding, exact sampling distribution, cache rollback."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_config

from dsv3.errors import ConfigError
from dsv3.infer.generate import generate, token_probs
from dsv3.infer.speculative import (
    SpeculativeDecoder,
    SpeculativeStats,
    accept_drafts,
    accept_greedy,
    speculative_generate,
)
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.mla import LatentKVCache

V = 48  # the trained model's vocabulary


def _chain_batch(gen, n=8, seqlen=24):
    """A noisy affine chain t_{i+1} = (5 t_i + 3) mod V with 10% random tokens: learnable in a few steps."""
    x = torch.empty(n, seqlen + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=gen)
    for i in range(seqlen):
        noise = torch.rand(n, generator=gen) < 0.1
        x[:, i + 1] = torch.where(noise, torch.randint(0, V, (n,), generator=gen), (5 * x[:, i] + 3) % V)
    return x[:, :-1], x[:, 1:]


@pytest.fixture(scope="module")
def trained():
    """A 2-MTP-module model trained for 25 steps: its drafts are often, but not always, right."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config(vocab_size=V, num_nextn_predict_layers=2, rope_scaling=None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids, labels = _chain_batch(gen)
        loss = model(ids, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _random_model(depth, seed=0):
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(small_config(num_nextn_predict_layers=depth)).double().eval()


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_plain_greedy_random_weights(depth):
    model = _random_model(depth)
    for seed, length in [(1, 7), (2, 1)]:
        ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))
        ref = generate(model, ids, max_new_tokens=20, temperature=0)
        stats = SpeculativeStats(depth)
        out = speculative_generate(model, ids, max_new_tokens=20, temperature=0, stats=stats)
        assert torch.equal(out, ref)
        assert stats.new_tokens == 20 and stats.rounds >= 1


def test_greedy_speculative_equals_plain_greedy_trained_model(trained):
    stats = SpeculativeStats(2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        ids = torch.randint(0, V, (1, 6), generator=gen)
        ref = generate(trained, ids, max_new_tokens=24, temperature=0)
        out = speculative_generate(trained, ids, max_new_tokens=24, temperature=0, stats=stats)
        assert torch.equal(out, ref)
    rates = stats.acceptance_rates()
    assert rates[0] > 0.3  # the trained MTP module drafts useful tokens, so acceptance paths run
    assert stats.tokens_per_round() > 1.3
    assert stats.proposed[1] == stats.accepted[0]  # position 2 is checked exactly when position 1 was accepted


def test_greedy_speculative_with_one_of_two_modules_and_eos(trained):
    ids = torch.tensor([[4, 23, 22]])
    ref = generate(trained, ids, max_new_tokens=16, temperature=0)
    out = speculative_generate(trained, ids, max_new_tokens=16, temperature=0, num_draft=1)
    assert torch.equal(out, ref)
    eos = int(ref[0, 3 + 5])  # stop at the 6th new token
    ref_eos = generate(trained, ids, max_new_tokens=16, temperature=0, eos_id=eos)
    out_eos = speculative_generate(trained, ids, max_new_tokens=16, temperature=0, eos_id=eos)
    assert torch.equal(out_eos, ref_eos) and out_eos[0, -1] == eos


def test_batched_greedy_speculative_equals_plain_greedy_per_row(trained):
    """B prompts at once: each row equals plain greedy decoding of that prompt alone, the round commits
    the fewest drafts any row accepted, and per-row acceptance is still counted."""
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(7))
    stats = SpeculativeStats(2)
    out = speculative_generate(trained, ids, max_new_tokens=20, temperature=0, stats=stats)
    for b in range(4):
        assert torch.equal(out[b : b + 1], generate(trained, ids[b : b + 1], max_new_tokens=20, temperature=0))
    assert stats.new_tokens == 4 * 20 and stats.proposed[0] == 4 * stats.rounds
    one = SpeculativeStats(2)
    speculative_generate(trained, ids[:1], max_new_tokens=20, temperature=0, stats=one)
    assert stats.rounds >= one.rounds  # a batch advances by its slowest row
    eos = int(out[1, 6 + 4])  # row 1 stops at its 5th new token; the others run on, or stop at it too
    ref = generate(trained, ids, max_new_tokens=20, temperature=0, eos_id=eos)
    assert torch.equal(speculative_generate(trained, ids, max_new_tokens=20, temperature=0, eos_id=eos), ref)


def test_batched_sampling_rows_follow_the_model(trained):
    """Batched speculative sampling: in the rows whose first new token (the prefill's) is the likeliest,
    the second (drawn in a speculative round, drafted and verified with the other rows) is distributed
    as the model's p(. | prompt, first): empirical frequencies of its top tokens within 4 sigma."""
    rows = 300
    ids = torch.tensor([[4, 23, 22]] * rows)
    out = speculative_generate(
        trained, ids, max_new_tokens=3, temperature=1.0, generator=torch.Generator().manual_seed(11)
    )
    with torch.no_grad():
        first = int(token_probs(trained(ids[:1]).logits[0, -1], temperature=1.0).argmax())
        p = token_probs(trained(torch.tensor([[4, 23, 22, first]])).logits[0, -1], temperature=1.0)
    second = out[out[:, 3] == first, 4]
    n = second.numel()
    assert n > 30
    for tok in torch.topk(p, 3).indices.tolist():
        freq = (second == tok).float().mean().item()
        assert abs(freq - p[tok].item()) < 4 * math.sqrt(p[tok].item() * (1 - p[tok].item()) / n) + 1e-3


def _fresh_latents(model, tokens, valid_main, valid_mtp):
    """Reference cache contents: the committed sequence run once from scratch (no rounds, no rollback)."""
    cfg = model.config
    ids = torch.tensor([tokens])
    cache = LatentKVCache(
        cfg.num_hidden_layers + len(model.mtp), 1, len(tokens) + 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    )
    with torch.no_grad():
        h = model(ids[:, :valid_main], cache=cache, start_pos=0).hidden_states
        emb = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(torch.arange(len(tokens)))
        for k, layer in enumerate(model.mtp, start=1):
            n = valid_mtp[k - 1]
            h = layer(h[:, :n], emb[:, k : k + n], cos[None, :n], sin[None, :n], cache=cache, start_pos=0)
    return cache


@pytest.mark.parametrize("forced", [False, True], ids=["sampled", "forced-rejections"])
def test_cache_rolls_back_to_the_committed_tokens(trained, monkeypatch, forced):
    """After every round (drafts rejected at random depths), every cache slot holds exactly what a
    from-scratch run over the committed tokens gives, and nothing past its valid length. ``forced`` cuts
    the accepted prefix at a random depth (any acceptance decision must leave a consistent cache)."""
    import dsv3.infer.speculative as spec

    if forced:
        real, rng = spec.accept_drafts, torch.Generator().manual_seed(5)

        def cut_short(drafts, q, p, **kw):
            a, nxt = real(drafts, q, p, **kw)
            cut = int(torch.randint(0, a + 1, (), generator=rng))
            return (a, nxt) if cut == a else (cut, (drafts[cut] + 1) % V)

        monkeypatch.setattr(spec, "accept_drafts", cut_short)
    gen = torch.Generator().manual_seed(0)
    dec = SpeculativeDecoder(trained, torch.tensor([[7, 2, 13, 20]]), max_new_tokens=40, temperature=1.5, generator=gen)
    dec.prefill()
    L = trained.config.num_hidden_layers
    depths = set()
    while len(dec.tokens) < 4 + 30:
        emitted = dec.step()[0]
        depths.add(len(emitted) - 1)
        valid_main = len(dec.tokens) - 1
        assert dec.cache.lengths[:L] == [valid_main] * L
        valid_mtp = [dec.cache.lengths[L + k] for k in range(2)]
        # module k keeps the positions i whose inputs t_{i+k} are committed (i + k <= newest - 1), within
        # what it had computed (up to the round's first position)
        a = len(emitted) - 1
        assert valid_mtp == [min(valid_main - a - 1, valid_main - k) for k in (1, 2)]
        ref = _fresh_latents(trained, dec.tokens, valid_main, valid_mtp)
        for layer in range(L + 2):
            n = dec.cache.lengths[layer]
            torch.testing.assert_close(dec.cache.c_kv[layer][:, :n], ref.c_kv[layer][:, :n], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(dec.cache.k_pe[layer][:, :n], ref.k_pe[layer][:, :n], atol=2e-5, rtol=1e-4)
            assert not dec.cache.c_kv[layer][:, n:].any() and not dec.cache.k_pe[layer][:, n:].any()
    if forced:
        assert depths == {0, 1, 2}  # rejections at both draft positions, and full acceptance


def test_latent_cache_rollback_and_gap():
    cache = LatentKVCache(2, 1, 8, 3, 2)
    cache.update(0, 0, torch.ones(1, 5, 3), torch.ones(1, 5, 2))
    cache.rollback(2, layers=[0])
    assert cache.lengths == [2, 0]
    assert cache.c_kv[0][:, :2].eq(1).all() and not cache.c_kv[0][:, 2:].any()
    with pytest.raises(ValueError, match="gap"):
        cache.update(0, 3, torch.ones(1, 1, 3), torch.ones(1, 1, 2))
    c, _ = cache.update(0, 2, 2 * torch.ones(1, 1, 3), torch.ones(1, 1, 2))
    assert c.shape[1] == 3 and cache.lengths[0] == 3


def _chi_square_pvalue(counts, expected):
    """Pearson chi-square upper-tail p-value (Wilson-Hilferty normal approximation), cells with E >= 5."""
    keep = expected >= 5
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_rejection_sampling_rule_gives_the_target_joint_distribution():
    """Synthetic p and q (conditional on the drafts): the first two emitted tokens follow p exactly."""
    gen = torch.Generator().manual_seed(0)
    v = 5
    p0 = torch.softmax(torch.randn(v, generator=gen), -1)
    p1 = torch.softmax(torch.randn(v, v, generator=gen), -1)  # p(t2 | t1)
    p2 = torch.softmax(torch.randn(v, v, v, generator=gen), -1)
    q1 = torch.softmax(torch.randn(v, generator=gen), -1)  # the draft's own, different distributions
    q2 = torch.softmax(torch.randn(v, v, generator=gen), -1)
    counts = torch.zeros(v, v)
    n = 8000
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=gen))
        d2 = int(torch.multinomial(q2[d1], 1, generator=gen))
        a, nxt = accept_drafts(
            [d1, d2], [q1, q2[d1]], torch.stack([p0, p1[d1], p2[d1, d2]]), greedy=False, generator=gen
        )
        emitted = [d1, d2][:a] + [nxt]
        if len(emitted) == 1:  # t1 is the correction; t2 would come from the next round, drawn from p1[t1]
            emitted.append(int(torch.multinomial(p1[emitted[0]], 1, generator=gen)))
        counts[emitted[0], emitted[1]] += 1
    expected = (p0[:, None] * p1) * n
    tv = 0.5 * (counts / n - expected / n).abs().sum()
    assert tv < 0.03, tv
    assert _chi_square_pvalue(counts.flatten(), expected.flatten()) > 1e-3
    # and the unfixed rule (always accept the draft) is far from p
    naive = (q1[:, None] * q2) * n
    assert 0.5 * (naive / n - expected / n).abs().sum() > 0.1


@pytest.mark.slow
def test_speculative_sampling_matches_the_model_distribution():
    """End to end, a 4-token-vocabulary model: the first two new tokens' joint distribution equals the
    model's (temperature and top-p applied to draft and target alike), and differs from the draft's."""
    v = 4
    torch.manual_seed(1)
    cfg = small_config(
        vocab_size=v,
        hidden_size=32,
        num_hidden_layers=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        rope_scaling=None,
    )
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random logits so that p is far from uniform
        model.lm_head.weight.mul_(5)
    prompt = torch.tensor([[1, 3, 2]])
    temperature, top_p = 0.9, 0.97
    with torch.no_grad():
        out = model(prompt)
        p1 = token_probs(out.logits[0, -1], temperature=temperature, top_p=top_p)
        rows = torch.cat([prompt.repeat(v, 1), torch.arange(v)[:, None]], dim=1)
        p2 = token_probs(model(rows).logits[:, -1], temperature=temperature, top_p=top_p)
        # the MTP module's draft distribution of t2 given t1 (training-path forward)
        emb = model.model.embed_tokens(rows[:, 1:])
        cos, sin = model.model.rotary_emb(torch.arange(3))
        h = model(rows[:, :3]).hidden_states
        hq = model.mtp[0](h, emb, cos[None], sin[None])[:, -1]
        q2 = token_probs(model.lm_head(model.mtp[0].shared_head.norm(hq)), temperature=temperature, top_p=top_p)
    target = p1[:, None] * p2  # [v, v]
    draft_joint = p1[:, None] * q2
    assert 0.5 * (target - draft_joint).abs().sum() > 0.1  # the draft alone would be visibly wrong
    gen = torch.Generator().manual_seed(0)
    stats = SpeculativeStats(1)
    n = 600
    counts = torch.zeros(v, v)
    for _ in range(n):
        out = speculative_generate(
            model, prompt, max_new_tokens=2, temperature=temperature, top_p=top_p, generator=gen, stats=stats
        )
        counts[out[0, 3], out[0, 4]] += 1
    assert 0 < stats.accepted[0] < stats.proposed[0]  # both outcomes of the rule happened
    assert 0.5 * (counts / n - target).abs().sum() < 0.08
    assert _chi_square_pvalue(counts.flatten(), (target * n).flatten()) > 1e-3
    assert _chi_square_pvalue(counts.flatten(), (draft_joint * n).flatten()) < 1e-3


def test_speculative_refuses_bad_input(trained):
    for shape in [(0, 3), (1, 0), (3,)]:
        with pytest.raises(ConfigError, match="non-empty prompts of one length"):
            speculative_generate(trained, torch.zeros(shape, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ConfigError, match="num_draft"):
        speculative_generate(trained, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, num_draft=3)
    no_mtp = DeepseekV3ForCausalLM(small_config(num_nextn_predict_layers=0))
    with pytest.raises(ConfigError, match="MTP modules"):
        speculative_generate(no_mtp, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


def test_stats_report():
    s = SpeculativeStats(2, proposed=[10, 8], accepted=[8, 4], rounds=10, new_tokens=22, seconds=2.0)
    d = s.to_dict()
    assert d["acceptance_rate"] == [0.8, 0.5] and d["tokens_per_round"] == 2.2 and d["tokens_per_s"] == 11.0
    assert SpeculativeStats(1).acceptance_rates() == [None]


def test_greedy_acceptance_rule_by_hand():
    eye = torch.eye(5)
    p = torch.stack([eye[2], eye[4], eye[1]])  # the target's argmax: 2, then 4, then bonus 1
    assert accept_drafts([2, 4], [eye[2], eye[4]], p, greedy=True) == (2, 1)  # all accepted + bonus
    assert accept_drafts([2, 3], [eye[2], eye[3]], p, greedy=True) == (1, 4)  # second rejected, corrected
    assert accept_drafts([0, 4], [eye[0], eye[4]], p, greedy=True) == (0, 2)  # first rejected


def test_sampling_acceptance_rule_accepts_what_the_target_prefers():
    """p(d) >= q(d) is always accepted; p(d) = 0 is always rejected and replaced from max(0, p - q)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.5, 0.0])
    p = torch.tensor([[0.0, 0.6, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    twos = 0
    for _ in range(400):
        assert accept_drafts([1], [q], p, greedy=False, generator=gen)[0] == 1
        a, nxt = accept_drafts([0], [q], p, greedy=False, generator=gen)
        assert a == 0 and nxt in (1, 2)
        twos += nxt == 2
    assert 0.72 < twos / 400 < 0.88  # the residual max(0, p - q) = [0, 0.1, 0.4]: token 2 with probability 0.8


def test_batched_greedy_acceptance_equals_the_rule_row_by_row():
    """accept_greedy on [B, D+1, V] logits gives, per row, what accept_drafts' greedy rule gives."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 3, 6, generator=gen)
    best = logits.argmax(-1)
    # drafts that match the argmax for a random prefix, then differ
    drafts = [[int(best[b, j]) if j < b % 3 else (int(best[b, j]) + 1) % 6 for j in range(2)] for b in range(64)]
    got = accept_greedy(drafts, logits)
    one_hot = torch.zeros_like(logits).scatter_(-1, best[..., None], 1.0)
    want = [accept_drafts(drafts[b], [None, None], one_hot[b], greedy=True) for b in range(64)]
    assert got == want and {a for a, _ in got} == {0, 1, 2}

"""Speculative decoding with the Multi-Token Prediction modules (report 5.4.3).

One round: the D MTP modules draft d_1 .. d_D (module k as in training, :mod:`dsv3.model.mtp`); one
forward of the main model over [t_N, d_1 .. d_D] gives the targets p_0 .. p_D; drafts are accepted
greedily (equal to argmax) or by rejection sampling (accept with min(1, p/q), else draw from
norm(max(0, p - q))), plus a bonus token after D acceptances; the caches roll back to the committed
tokens (:meth:`~dsv3.model.mla.LatentKVCache.rollback`). Greedy output equals
:func:`~dsv3.infer.generate.generate`'s token for token; sampled tokens are distributed exactly as under
plain sampling. Batched rows commit the fewest drafts any row accepted. The notation and the four steps
in full: docs/inference.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dsv3.errors import ConfigError
from dsv3.infer.generate import check_finite, check_length, check_sampling, token_probs
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.mla import LatentKVCache


@dataclass
class SpeculativeStats:
    """Counters of speculative decoding, summed over calls.

    Attributes:
        draft_tokens: D, tokens drafted per round.
        proposed: [D] how often draft position j was checked (all earlier drafts accepted).
        accepted: [D] how often it was accepted.
        rounds: verification forwards of the main model.
        new_tokens: tokens emitted.
        seconds: wall time.
        draft_seconds, verify_seconds: the parts of it spent drafting (MTP modules) and verifying
            (main-model forward, acceptance, rollback).
    """

    draft_tokens: int
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.proposed = self.proposed or [0] * self.draft_tokens
        self.accepted = self.accepted or [0] * self.draft_tokens

    def acceptance_rates(self) -> list[float | None]:
        """P(draft j accepted | drafts 1..j-1 accepted), per draft position (None if never checked)."""
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed)]

    def tokens_per_round(self) -> float:
        """Mean tokens emitted per main-model forward, summed over the rows of a batch (one row: 1 + mean
        accepted drafts)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {
            "draft_tokens": self.draft_tokens,
            "acceptance_rate": self.acceptance_rates(),
            "proposed": self.proposed,
            "accepted": self.accepted,
            "rounds": self.rounds,
            "new_tokens": self.new_tokens,
            "tokens_per_round": self.tokens_per_round(),
            "seconds": self.seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "tokens_per_s": self.new_tokens / self.seconds if self.seconds else None,
        }


def _distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """p or q for one position [V]: one-hot of the argmax when greedy, else :func:`token_probs`."""
    if temperature <= 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return token_probs(logits, temperature=temperature, top_p=top_p)


def _draw(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_drafts(
    drafts: list[int], q: list[torch.Tensor], p: torch.Tensor, *, greedy: bool, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The acceptance rule of one round.

    Args:
        drafts: d_1 .. d_D. q: their draft distributions q_1 .. q_D, each [V].
        p: [D+1, V] target distributions of t_{N+1} .. t_{N+D+1}.
        greedy: accept d_j iff it is argmax p_{j-1}; otherwise rejection sampling.
    Returns:
        (a, next): the number of accepted drafts and the token emitted after them
        (the correction drawn from norm(max(0, p - q)) or argmax, or the bonus from p_D).
    """
    for j, (d, qj) in enumerate(zip(drafts, q)):
        pj = p[j]
        if greedy:
            best = int(pj.argmax())
            if best != d:
                return j, best
            continue
        u = torch.rand((), generator=generator, device=pj.device)
        if bool(u * qj[d] < pj[d]):  # u < p(d)/q(d), without dividing
            continue
        residual = (pj - qj).clamp_min(0)
        total = residual.sum()
        return j, _draw(residual / total if bool(total > 0) else pj, False, generator)
    return len(drafts), _draw(p[len(drafts)], greedy, generator)


def accept_greedy(drafts: list[list[int]], logits: torch.Tensor) -> list[tuple[int, int]]:
    """The greedy rule of :func:`accept_drafts` for B rows at once.

    Args:
        drafts: [B][D] drafted tokens. logits: [B, D+1, V] the verification forward's logits.
    Returns:
        (a_b, next_b) per row: a_b drafts match argmax p_0..p_{a_b - 1}; next_b = argmax p_{a_b}.
    """
    best = logits.argmax(-1)  # [B, D+1]
    d = len(drafts[0])
    accepted = (best[:, :d] == torch.tensor(drafts, device=best.device)).int().cumprod(1).sum(1)  # [B]
    nxt = best.gather(1, accepted[:, None])[:, 0]
    return list(zip(accepted.tolist(), nxt.tolist()))


class _MTPDrafter:
    """The MTP modules' state: their latent cache slots, h^k per position, and how far each is valid."""

    def __init__(
        self, model: DeepseekV3ForCausalLM, cache: LatentKVCache, depth: int, batch: int, max_len: int
    ) -> None:
        self.model, self.cache, self.depth = model, cache, depth
        self.first_slot = model.config.num_hidden_layers  # MTP module k uses cache slot L + k - 1
        d = model.config.hidden_size
        w = model.model.embed_tokens.weight
        # hidden[k] [B, max_len, d]: h^k at each position (hidden[0] from the main model)
        self.hidden = [torch.zeros(batch, max_len, d, dtype=w.dtype, device=w.device) for _ in range(depth)]
        self.valid = [0] * (depth + 1)  # valid[k]: positions 0..valid[k]-1 of module k hold committed inputs

    def draft(
        self, rows: list[list[int]], n: int, temperature: float, top_p: float, generator: torch.Generator | None
    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Draft d_1..d_D for each row after its committed tokens t_0..t_N (``n`` = N); h^0 is known up
        to N-1. Returns the drafts and their distributions q_1..q_D ([V] each; none when greedy), per row."""
        model, greedy = self.model, temperature <= 0
        device = self.hidden[0].device
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor]] = [[] for _ in rows]
        for k in range(1, self.depth + 1):
            start = self.valid[k]
            # t_{i+k} for positions i = start .. N-1, per row [B, N - start]
            ids = torch.tensor([(r + d)[start + k : n + k] for r, d in zip(rows, drafts)], device=device)
            positions = torch.arange(start, n, device=device)
            cos, sin = model.model.rotary_emb(positions)
            layer = model.mtp[k - 1]
            h = layer(
                self.hidden[k - 1][:, start:n],
                model.model.embed_tokens(ids),
                cos[None],
                sin[None],
                cache=self.cache,
                start_pos=start,
            )
            if k < self.depth:
                self.hidden[k][:, start:n] = h
            self.valid[k] = n  # provisional: positions past the committed tokens are cut in commit()
            logits = model.lm_head(layer.shared_head.norm(h[:, -1]))  # [B, V]
            check_finite(logits, n + k)
            if greedy:  # argmax of all rows at once; greedy acceptance needs no q
                for b, token in enumerate(logits.argmax(-1).tolist()):
                    drafts[b].append(token)
                continue
            for b in range(len(rows)):
                q = _distribution(logits[b], temperature, top_p)
                drafts[b].append(_draw(q, greedy, generator))
                qs[b].append(q)
        return drafts, qs

    def commit(self, last: int) -> None:
        """Tokens t_0..t_last are committed: module k keeps positions i with i + k <= last."""
        for k in range(1, self.depth + 1):
            keep = min(self.valid[k], max(last - k + 1, 0))
            self.valid[k] = keep
            self.cache.rollback(keep, layers=[self.first_slot + k - 1])


class SpeculativeDecoder:
    """The state of one speculative decoding of B prompts of one length: committed tokens per row, the
    latent cache (main layers in slots 0..L-1, MTP module k in slot L+k-1) and the MTP drafter.

    Args:
        model: a model with MTP modules. input_ids: [B, T0] the prompts (no padding).
        max_new_tokens: the most tokens it will emit per row. num_draft: D (default: every MTP module).
        temperature, top_p: as :func:`~dsv3.infer.generate.sample_next`.
    :meth:`prefill` runs the prompts and emits the first token of each row; each :meth:`step` is one
    draft-verify-accept round that emits 1 .. D+1 tokens per row. The rows share one cache length, so a
    round commits a = min_b a_b accepted drafts in every row (with B = 1, all of them): a row that
    accepted more keeps its first a+1 tokens (each a valid draw given its prefix) and redrafts the rest.
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_draft: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        depth = len(model.mtp) if num_draft is None else num_draft
        if len(model.mtp) == 0:
            raise ConfigError("speculative decoding needs the model's MTP modules (num_nextn_predict_layers >= 1)")
        if not 1 <= depth <= len(model.mtp):
            raise ConfigError(f"num_draft must be between 1 and the model's {len(model.mtp)} MTP modules, got {depth}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ConfigError("speculative decoding takes non-empty prompts of one length ([B, T] token ids)")
        check_sampling(temperature, top_p)
        check_length(model, input_ids.shape[1], max_new_tokens, extra=depth)
        self.model, self.depth, self.generator = model, depth, generator
        self.temperature, self.top_p, self.greedy = temperature, top_p, temperature <= 0
        cfg = model.config
        batch, self.prompt_len = input_ids.shape
        max_len = self.prompt_len + max_new_tokens + depth + 1
        w = model.model.embed_tokens.weight
        self.cache = LatentKVCache(
            cfg.num_hidden_layers + len(model.mtp),
            batch,
            max_len,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            dtype=w.dtype,
            device=w.device,
        )
        self.main_layers = range(cfg.num_hidden_layers)
        self.drafter = _MTPDrafter(model, self.cache, depth, batch, max_len)
        self.rows: list[list[int]] = input_ids.tolist()
        self.proposed = [0] * depth  # per draft position, summed over rows (each row's own acceptance)
        self.accepted = [0] * depth
        self.rounds = 0
        self.draft_seconds = 0.0  # wall time spent drafting (MTP modules) and verifying (main model)
        self.verify_seconds = 0.0

    @property
    def tokens(self) -> list[int]:
        """The committed tokens of the first (with B = 1, the only) row."""
        return self.rows[0]

    def _sample(self, logits: torch.Tensor) -> int:
        return _draw(_distribution(logits, self.temperature, self.top_p), self.greedy, self.generator)

    @torch.no_grad()
    def prefill(self) -> list[int]:
        """Run the prompts through the main model; returns the first new token of each row."""
        out = self.model(torch.tensor(self.rows, device=self.cache.c_kv[0].device), cache=self.cache, start_pos=0)
        self.drafter.hidden[0][:, : self.prompt_len] = out.hidden_states
        logits = out.logits[:, -1]
        check_finite(logits, self.prompt_len)
        for row, row_logits in zip(self.rows, logits):
            row.append(self._sample(row_logits))
        return [row[-1] for row in self.rows]

    def _count(self, a: int) -> None:
        for j in range(min(a + 1, self.depth)):
            self.proposed[j] += 1
        for j in range(a):
            self.accepted[j] += 1

    @torch.no_grad()
    def step(self) -> list[list[int]]:
        """One round: draft D tokens per row, verify them in one main-model forward, accept, roll back.
        Returns the tokens emitted per row (accepted drafts, then the correction or bonus token)."""
        model, n = self.model, len(self.rows[0]) - 1  # t_n is committed but not yet run through the main model
        started = time.perf_counter()
        drafts, qs = self.drafter.draft(self.rows, n, self.temperature, self.top_p, self.generator)
        drafted = time.perf_counter()
        self.draft_seconds += drafted - started
        verify = torch.tensor([[row[n]] + d for row, d in zip(self.rows, drafts)], device=self.cache.c_kv[0].device)
        out = model(verify, cache=self.cache, start_pos=n)
        self.rounds += 1
        check_finite(out.logits, n)
        if self.greedy:
            decided = accept_greedy(drafts, out.logits)
        else:
            decided = []
            for b, row_logits in enumerate(out.logits):
                p = torch.stack([_distribution(x, self.temperature, self.top_p) for x in row_logits])
                decided.append(accept_drafts(drafts[b], qs[b], p, greedy=False, generator=self.generator))
        for ab, _ in decided:
            self._count(ab)
        a = min(ab for ab, _ in decided)  # every row commits a drafts (the cache has one length)
        emitted = [d[:a] + [nxt if ab == a else d[a]] for d, (ab, nxt) in zip(drafts, decided)]
        self.drafter.hidden[0][:, n : n + a + 1] = out.hidden_states[:, : a + 1]
        self.cache.rollback(n + a + 1, layers=self.main_layers)  # main cache: positions 0 .. n+a
        for row, new in zip(self.rows, emitted):
            row.extend(new)
        self.drafter.commit(n + a)
        self.verify_seconds += time.perf_counter() - drafted
        return emitted


def _cut_at_eos(new: list[list[int]], max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    """Each row's tokens up to its first ``eos_id`` (then ``eos_id`` repeated, as :func:`generate` pads
    rows that stopped), all cut to the same length: ``max_new_tokens`` or the longest row's EOS."""
    new = [row[:max_new_tokens] for row in new]
    if eos_id is None:
        return new
    ends = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in new]
    width = max(ends)
    return [row[:end] + [eos_id] * (width - end) for row, end in zip(new, ends)]


@torch.no_grad()
def speculative_generate(
    model: DeepseekV3ForCausalLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    num_draft: int | None = None,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` [B, T0] (prompts of one length) by up to ``max_new_tokens`` tokens with MTP
    drafts; returns [B, T0 + n].

    Args:
        num_draft: drafts per round D (default: every MTP module; at most their number).
        stats: a :class:`SpeculativeStats` to add this call's counts to.
    A row stops after ``eos_id`` (later positions repeat it, as in :func:`~dsv3.infer.generate.generate`);
    decoding ends when every row has. Sampling follows :func:`~dsv3.infer.generate.sample_next`'s
    distribution exactly; with ``temperature == 0`` it is greedy.
    """
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        dec = SpeculativeDecoder(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            num_draft=num_draft,
            generator=generator,
        )
        if stats is not None and stats.draft_tokens != dec.depth:
            raise ConfigError(f"stats count {stats.draft_tokens} drafts per round, this call drafts {dec.depth}")
        new = [[t] for t in dec.prefill()]

        def finished() -> bool:
            return all(len(row) >= max_new_tokens or (eos_id is not None and eos_id in row) for row in new)

        while not finished():
            for row, emitted in zip(new, dec.step()):
                row.extend(emitted)
        new = _cut_at_eos(new, max_new_tokens, eos_id)
        if stats is not None:
            stats.rounds += dec.rounds
            stats.new_tokens += sum(len(row) for row in new)
            stats.proposed = [x + y for x, y in zip(stats.proposed, dec.proposed)]
            stats.accepted = [x + y for x, y in zip(stats.accepted, dec.accepted)]
            stats.seconds += time.perf_counter() - started
            stats.draft_seconds += dec.draft_seconds
            stats.verify_seconds += dec.verify_seconds
        return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device)], dim=1)
    finally:
        model.train(was_training)

"""Sampling text with the MLA latent KV cache, one prompt or a batch of prompts of different lengths.

The prompt is run once through the absorbed-attention path, filling the cache
with c^KV and k^R; each new token then costs one single-position forward.

Batches of prompts of different lengths are left-padded: row b's first ``pad[b]``
cache slots hold padding that no real token attends to
(:meth:`~dsv3.model.mla.LatentKVCache.set_padding`). RoPE makes attention depend
only on query-key position differences, and MoE routing is per token, so each row
decodes as it would alone (equal up to floating-point rounding).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dsv3.errors import CheckpointError, ConfigError
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.parallel.checkpointer import Checkpointer


def token_probs(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution of ``logits`` [..., V]: softmax(logits / temperature) restricted to
    the smallest set of top tokens whose probability reaches ``top_p`` (nucleus), renormalised.
    ``temperature`` must be positive. Returns float32 probabilities [..., V]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits`` [B, V]: greedy when ``temperature == 0``,
    otherwise from :func:`token_probs`. Returns [B] token ids.

    ``generator`` may be a list of B generators, one per row: row b then draws its uniform
    u_b from its own generator and takes the first token whose cumulative probability exceeds
    u_b (inverse CDF), so a row's sample does not depend on the other rows of the batch
    (GRPO seeds each (step, prompt, sample) this way)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = token_probs(logits, temperature=temperature, top_p=top_p)
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generator]).to(probs.device)
        cdf = probs.double().cumsum(dim=-1)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        return token.clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse a NaN/infinite/negative ``temperature`` or a ``top_p`` outside (0, 1] (ConfigError)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def check_length(model: DeepseekV3ForCausalLM, prompt_len: int, max_new_tokens: int, extra: int = 0) -> None:
    """Refuse (ConfigError) a prompt plus ``max_new_tokens`` (plus ``extra`` speculative positions) that
    does not fit the model's context ``max_position_embeddings``, before any cache is allocated."""
    limit = model.config.max_position_embeddings
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if prompt_len + max_new_tokens + extra > limit:
        room = limit - prompt_len - extra
        hint = f"use --max-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigError(
            f"a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit} positions; {hint}"
        )


def check_finite(logits: torch.Tensor, position: int) -> None:
    """Raise a one-line CheckpointError when ``logits`` hold NaN or infinity (damaged weights)."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"the model produced non-finite logits at position {position}; "
            "its weights are damaged (NaN or infinite values)"
        )


class ExpertLoadCollector:
    """Counts the tokens each routed expert receives while generating (per-layer expert loads).

    Hooks the router of every MoE layer of ``model`` (main layers, then MTP modules: the
    order of :meth:`~dsv3.model.DeepseekV3ForCausalLM.moe_layers`). ``token_mask`` [B*T] bool, set
    before a forward, leaves padding tokens out: pass the collector as ``loads=`` to
    :func:`generate` / :func:`generate_batch` so that they set it. ``load`` is [n_moe_layers, N_r] int64; use as a
    context manager (the hooks are removed on exit).
    """

    def __init__(self, model: DeepseekV3ForCausalLM) -> None:
        moes = model.moe_layers()
        self.routers = [getattr(m.gate, "router", m.gate) for m in moes]  # the logical router when replicated
        self.num_experts = model.config.n_routed_experts
        device = model.model.embed_tokens.weight.device
        self.load = torch.zeros(len(moes), self.num_experts, dtype=torch.long, device=device)
        self.token_mask: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> "ExpertLoadCollector":
        for i, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            indices = output[1]  # [N, K_r] selected experts
            if self.token_mask is not None and self.token_mask.numel() == indices.shape[0]:
                indices = indices[self.token_mask]
            self.load[layer] += torch.bincount(indices.reshape(-1), minlength=self.num_experts)

        return hook


@torch.no_grad()
def generate(
    model: DeepseekV3ForCausalLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    pad: torch.Tensor | None = None,
    loads: ExpertLoadCollector | None = None,
    all_done: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` [B, T0] by up to ``max_new_tokens`` tokens; returns [B, T0 + n].

    Rows stop growing after they emit ``eos_id`` (later positions repeat it); the
    loop ends when every row has stopped. ``pad`` [B] (optional) counts the leading
    padding tokens of each row (left-padded prompts of different lengths). ``all_done``
    (optional) decides from the rows' ``done`` [B] bool whether to stop: under expert
    parallelism every rank of an ep group must keep running forwards (all-to-alls) until
    all of them have finished. ``generator``: one, or one per row (:func:`sample_next`).
    Raises CheckpointError when the model's logits are not finite.
    """
    check_sampling(temperature, top_p)
    check_length(model, input_ids.shape[1], max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        bsz, prompt_len = input_ids.shape
        cache = model.new_cache(bsz, prompt_len + max_new_tokens)
        if pad is not None:
            cache.set_padding(pad)
            if loads is not None:
                slots = torch.arange(prompt_len, device=input_ids.device)
                loads.token_mask = (slots[None, :] >= cache.pad[:, None]).reshape(-1)
        logits = model(input_ids, cache=cache, start_pos=0).logits[:, -1]
        if loads is not None:
            loads.token_mask = None
        out = [input_ids]
        done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        for pos in range(prompt_len, prompt_len + max_new_tokens):
            check_finite(logits, pos)
            token = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            out.append(token[:, None])
            if eos_id is not None and (all_done(done) if all_done is not None else bool(done.all())):
                break
            if pos + 1 < prompt_len + max_new_tokens:
                if loads is not None and eos_id is not None:
                    loads.token_mask = ~done  # finished rows only repeat EOS: not traffic
                logits = model(token[:, None], cache=cache, start_pos=pos).logits[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
        if loads is not None:
            loads.token_mask = None


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``ids`` [B, max len] and ``pad`` [B] (padding tokens per row)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt of a batch needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)


def generate_batch(
    model: DeepseekV3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    loads: ExpertLoadCollector | None = None,
) -> list[list[int]]:
    """Decode prompts of different lengths (lists of token ids) in one batch.

    Returns each prompt's new tokens, cut before its first ``eos_id``. With greedy decoding
    each result equals :func:`generate` on that prompt alone.
    """
    device = model.model.embed_tokens.weight.device
    ids, pad = left_pad(prompts, eos_id if eos_id is not None else 0, device=device)
    tokens = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos_id,
        generator=generator,
        pad=pad if bool(pad.any()) else None,
        loads=loads,
    )
    return [_cut(row, eos_id) for row in tokens[:, ids.shape[1] :].tolist()]


def _cut(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


def encode_prompt(tokenizer, prompt: str, eos_id: int | None) -> list[int]:
    """Token ids of ``prompt``; an empty prompt means "start of a document" (the EOS token, or 0)."""
    ids = tokenizer.encode(prompt).ids
    return ids or [eos_id if eos_id is not None else 0]


def generate_text(
    model: DeepseekV3ForCausalLM,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    loads: ExpertLoadCollector | None = None,
) -> str:
    """Sample a continuation of ``prompt`` with a Hugging Face ``tokenizers.Tokenizer``; returns prompt + text."""
    return generate_texts(
        model,
        tokenizer,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_id=eos_id,
        loads=loads,
    )[0]


def generate_texts(
    model: DeepseekV3ForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    loads: ExpertLoadCollector | None = None,
) -> list[str]:
    """Continue several prompts in one batch (:func:`generate_batch`); returns prompt + text for each."""
    check_sampling(temperature, top_p)
    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = [encode_prompt(tokenizer, p, eos_id) for p in prompts]
    new = generate_batch(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos_id,
        generator=gen,
        loads=loads,
    )
    return [p + tokenizer.decode(n) for p, n in zip(prompts, new)]


def load_for_generation(path: str, *, use_ema: bool = False, device: str = "cpu", keep_mtp: bool = False):
    """Load a run directory's latest checkpoint (or a checkpoint, a ``dcp-*`` or a HF directory) for sampling.

    Returns ``(model, checkpoint_dir)``; the MTP modules are dropped unless ``keep_mtp``
    (speculative decoding drafts with them), and with ``use_ema`` the checkpoint's EMA
    weights replace the trained ones.
    """
    model, checkpoint = Checkpointer.load_for_inference(path, device=device, use_ema=use_ema)
    if not keep_mtp:
        model.drop_mtp()
    return model.eval(), checkpoint

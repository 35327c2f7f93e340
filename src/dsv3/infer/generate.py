"""Sampling text with the MLA latent KV cache.

The prompt is run once through the absorbed-attention path, filling the cache
with c^KV and k^R; each new token then costs one single-position forward.
"""

from __future__ import annotations

import torch

from dsv3.model import DeepseekV3ForCausalLM


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``logits`` [B, V]: greedy when ``temperature == 0``,
    otherwise softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling). Returns [B] token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: DeepseekV3ForCausalLM, input_ids: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``input_ids`` [B, T0] by up to ``max_new_tokens`` tokens; returns [B, T0 + n].

    Rows stop growing after they emit ``eos_id`` (later positions repeat it); the
    loop ends when every row has stopped.
    """
    was_training = model.training
    model.eval()
    try:
        bsz, prompt_len = input_ids.shape
        cache = model.new_cache(bsz, prompt_len + max_new_tokens)
        logits = model(input_ids, cache=cache, start_pos=0).logits[:, -1]
        out = [input_ids]
        done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        for pos in range(prompt_len, prompt_len + max_new_tokens):
            token = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            out.append(token[:, None])
            if eos_id is not None and bool(done.all()):
                break
            if pos + 1 < prompt_len + max_new_tokens:
                logits = model(token[:, None], cache=cache, start_pos=pos).logits[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def generate_text(model: DeepseekV3ForCausalLM, tokenizer, prompt: str, *, max_new_tokens: int = 100,
                  temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, eos_id: int | None = None) -> str:
    """Sample a continuation of ``prompt`` with a Hugging Face ``tokenizers.Tokenizer``; returns prompt + text."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        ids = [eos_id if eos_id is not None else 0]  # an empty prompt means "start of a document"
    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = generate(model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, eos_id=eos_id, generator=gen)
    new = tokens[0, len(ids):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return prompt + tokenizer.decode(new)


def load_for_generation(path: str, *, use_ema: bool = False, device: str = "cpu"):
    """Load a run directory's latest checkpoint (or a checkpoint/HF directory) for sampling.

    Returns ``(model, checkpoint_dir)``; the MTP modules are dropped, and with ``use_ema``
    the checkpoint's EMA weights replace the trained ones.
    """
    import json
    import os

    from safetensors.torch import load_file

    from dsv3.checkpoint.hf import from_pretrained
    from dsv3.checkpoint.state import STATE_FILE, join_tensors, resolve_checkpoint
    from dsv3.errors import CheckpointError

    checkpoint = resolve_checkpoint(path)
    model = from_pretrained(checkpoint, device=device)
    model.drop_mtp()
    if use_ema:
        ema_file = os.path.join(checkpoint, "ema.safetensors")
        if not os.path.isfile(ema_file):
            raise CheckpointError(f"checkpoint {checkpoint} holds no EMA weights (train with --ema-decay)")
        with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as fh:
            meta = json.load(fh)["ema"]
        shadow = join_tensors(meta, load_file(ema_file))["shadow"]
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in shadow.items():
                if name in params:
                    params[name].copy_(value)
    return model.eval(), checkpoint

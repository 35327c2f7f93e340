"""GRPO rollouts: G seeded completions per prompt from the latent-cache batched generator, and the
MoE routing they used.

Row b is its prompt left-padded to the batch's widest prompt (``pad[b]`` padding tokens; ``prompt_len`` = T0),
then the sampled completion; rows that emitted EOS repeat it until every row has finished. The training
forward of :mod:`dsv3.train.grpo` reuses this layout (inputs ``tokens[:, :-1]``, padding kept out of
attention by ``segment_ids``), so the rollout's expert choices can be compared with, or replayed into, it.
Row b samples from its own generator seeded by (run seed, step, the prompt's global position, sample index)
(:func:`sample_seed`), by inverse-CDF sampling: dp ranks sample what one process samples.
Details: docs/rl.md ("Module notes").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from dsv3.infer.generate import generate, left_pad


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The seed of one completion: a fixed mix of (run seed, step, prompt position, sample index) into 62 bits."""
    x = 0
    for v in (seed, step, prompt, sample):
        x = (x * 6364136223846793005 + v + 1442695040888963407) % (1 << 62)
    return x


class RoutingRecorder:
    """Records the experts each MoE router chose, or compares (and replays) them, through the router's
    ``route_override`` seam (:class:`dsv3.model.moe.Router`).

    :meth:`recording` collects, per MoE layer, the [N, K_r] choices of each forward (N = rows x positions);
    :meth:`training` installs, per layer, the rollout's choice ``reference[l]`` [N, K_r] for the next
    forwards: with ``count`` it tallies the valid tokens whose set of experts equals the rollout's
    (``agree`` / ``total``); with ``replay`` the router uses the rollout's choice instead of its own.
    """

    def __init__(self, model) -> None:
        self.routers = [getattr(m.gate, "router", m.gate) for m in model.moe_layers()]
        device = model.model.embed_tokens.weight.device
        self.agree = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def active(self) -> bool:
        return bool(self.routers)

    @contextlib.contextmanager
    def _installed(self, overrides: Sequence[Callable]) -> Iterator[None]:
        for router, fn in zip(self.routers, overrides):
            router.route_override = fn
        try:
            yield
        finally:
            for router in self.routers:
                router.route_override = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[list[torch.Tensor]]]:
        """Yields ``pieces``: per layer, the [N, K_r] choice of each forward, in order."""
        pieces: list[list[torch.Tensor]] = [[] for _ in self.routers]

        def record(layer: int):
            def fn(indices: torch.Tensor) -> torch.Tensor:
                pieces[layer].append(indices.clone())
                return indices

            return fn

        with self._installed([record(i) for i in range(len(self.routers))]):
            yield pieces

    @contextlib.contextmanager
    def training(
        self, reference: Sequence[torch.Tensor], valid: torch.Tensor, *, replay: bool, count: bool
    ) -> Iterator[None]:
        """Compare with (``count``) and/or replay (``replay``) the rollout's choice ``reference[l]`` [N, K_r];
        ``valid`` [N] bool marks the tokens that count (completion positions)."""

        def compare(layer: int):
            def fn(indices: torch.Tensor) -> torch.Tensor:
                ref = reference[layer].to(indices.device)
                if count:
                    same = (indices.sort(dim=-1).values == ref.sort(dim=-1).values).all(dim=-1)
                    self.agree += (same & valid).sum()
                    self.total += valid.sum()
                return ref if replay else indices

            return fn

        with self._installed([compare(i) for i in range(len(self.routers))]):
            yield

    def tally(self) -> torch.Tensor:
        """``[agree, total]`` float64 counted since the last call (sum them over ranks); resets the tally."""
        out = torch.stack([self.agree, self.total]).clone()
        self.agree.zero_()
        self.total.zero_()
        return out


@dataclass
class Rollout:
    """One batch of sampled completions (see the module docstring for the layout).

    Attributes:
        tokens: [B, W] prompt (left-padded) + completion (+ EOS repeated) per row.
        pad: [B] leading padding tokens of each row.
        prompt_len: T0, the padded prompt width.
        completion_len: [B] completion tokens of each row, its EOS included when it emitted one.
        cut: [B] bool, rows that reached the limit without EOS.
        completions: [B] lists of completion token ids (without the EOS).
        routing: per MoE layer, the experts of every fed token [B, W - 1, K_r] (None: not recorded).
    """

    tokens: torch.Tensor
    pad: torch.Tensor
    prompt_len: int
    completion_len: torch.Tensor
    cut: torch.Tensor
    completions: list[list[int]]
    routing: list[torch.Tensor] | None = None

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training forward's ``(input_ids [B, W-1], targets [B, W-1], segment_ids or None)``;
        the padding is its own segment, so real tokens never attend to it."""
        ids, targets = self.tokens[:, :-1], self.tokens[:, 1:]
        if not bool(self.pad.any()):
            return ids, targets, None
        pos = torch.arange(ids.shape[1], device=ids.device)
        return ids, targets, (pos[None, :] >= self.pad[:, None].to(ids.device)).long()

    def mask(self) -> torch.Tensor:
        """[B, W-1] float: 1 where the target is a completion token (its EOS included)."""
        pos = torch.arange(1, self.tokens.shape[1], device=self.tokens.device)[None, :]
        end = self.prompt_len + self.completion_len.to(self.tokens.device)[:, None]
        return ((pos >= self.prompt_len) & (pos < end)).float()


def rollout(
    model,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    recorder: RoutingRecorder | None = None,
    all_done: Callable[[torch.Tensor], bool] | None = None,
) -> Rollout:
    """Sample one completion per row of ``prompts`` (token lists; a group's G copies are contiguous),
    row b with the generator seeded ``seeds[b]``; record the routing when ``recorder`` is given."""
    device = model.model.embed_tokens.weight.device
    ids, pad = left_pad(prompts, eos_id, device=device)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos_id,
        generator=gens,
        pad=pad if bool(pad.any()) else None,
        all_done=all_done,
    )
    routing = None
    if recorder is not None and recorder.active:
        with recorder.recording() as pieces:
            tokens = generate(model, ids, **kwargs)
        bsz = ids.shape[0]
        routing = [torch.cat([p.view(bsz, -1, p.shape[-1]) for p in layer], dim=1) for layer in pieces]
    else:
        tokens = generate(model, ids, **kwargs)
    t0 = ids.shape[1]
    new = tokens[:, t0:].tolist()
    completions, lengths, cut = [], [], []
    for row in new:
        stop = row.index(eos_id) if eos_id in row else None
        completions.append(row[:stop] if stop is not None else row)
        lengths.append(stop + 1 if stop is not None else len(row))
        cut.append(stop is None)
    return Rollout(
        tokens=tokens,
        pad=pad,
        prompt_len=t0,
        completion_len=torch.tensor(lengths),
        cut=torch.tensor(cut),
        completions=completions,
        routing=routing,
    )

"""MTP speculative decoding against plain latent-cache decoding, on a model trained with MTP.

Loads a run's latest checkpoint (with its MTP modules), takes prompts from the Python standard
library (the demo corpus: the first ``--prompt-tokens`` tokens of each of ``--prompts`` files picked
at random), and for each prompt decodes ``--max-tokens`` tokens plainly and speculatively, in
alternating order so that a drifting shared machine slows both alike. Reports the acceptance rate
per draft position, tokens per main-model forward, and the median per-prompt speed-up, for greedy
decoding and for sampling (``--temperature``). Greedy outputs are checked to be identical.

    python bench/speculative.py RUN_DIR [--prompts 8] [--max-tokens 64] [--temperature 0.8]

The model measured in results (2.6M parameters, 3 layers, 16 experts, one MTP module) was trained with

    dsv3 train --model bench/speculative_model.json --seq-len 128 --steps 600 --run-dir runs/spec
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from dsv3.infer.generate import generate, load_for_generation
from dsv3.infer.speculative import SpeculativeStats, speculative_generate
from dsv3.train.tokenizer import get_tokenizer


def _prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        ids = tokenizer.encode(rng.choice(files).read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) > length:
            start = rng.randrange(0, len(ids) - length)
            out.append(ids[start:start + length])
    return out


def _run(model, prompts, max_tokens, temperature, top_p, seed, eos):
    stats = SpeculativeStats(len(model.mtp))
    speedups, plain_tps, spec_tps, same = [], [], [], 0
    for i, prompt in enumerate(prompts):
        x = torch.tensor([prompt])
        timings = {}
        for mode in (("plain", "spec") if i % 2 == 0 else ("spec", "plain")):
            gen = torch.Generator().manual_seed(seed + i)
            started = time.perf_counter()
            if mode == "plain":
                out = generate(model, x, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               generator=gen, eos_id=eos)
            else:
                out = speculative_generate(model, x, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                           generator=gen, eos_id=eos, stats=stats)
            timings[mode] = (time.perf_counter() - started, out.shape[1] - len(prompt), out)
        plain_tps.append(timings["plain"][1] / timings["plain"][0])
        spec_tps.append(timings["spec"][1] / timings["spec"][0])
        speedups.append(spec_tps[-1] / plain_tps[-1])
        same += torch.equal(timings["plain"][2], timings["spec"][2])
    return {"temperature": temperature, "top_p": top_p, "acceptance_rate": stats.acceptance_rates(),
            "tokens_per_forward": stats.tokens_per_round(), "new_tokens": stats.new_tokens,
            "plain_tokens_per_s_median": statistics.median(plain_tps),
            "speculative_tokens_per_s_median": statistics.median(spec_tps),
            "speedup_median": statistics.median(speedups), "identical_outputs": f"{same}/{len(prompts)}",
            # one round = one draft (the MTP block(s) and the head) + one verification forward
            "draft_share_of_round": stats.draft_seconds / (stats.draft_seconds + stats.verify_seconds),
            # the speed-up if drafting cost 1/61 of a verification (one MTP block next to 61 layers, as in V3)
            "projected_speedup_v3_ratio": stats.tokens_per_round()
            / (stats.verify_seconds / stats.rounds * (1 + 1 / 61)) / statistics.median(plain_tps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, checkpoint = load_for_generation(args.run_dir, keep_mtp=True)
    tokenizer = get_tokenizer(str(Path(checkpoint) / "tokenizer.json"), vocab_size=model.config.vocab_size)
    prompts = _prompts(tokenizer, args.prompts, args.prompt_tokens, args.seed)
    print(f"checkpoint {checkpoint}: {model.num_parameters():,} parameters, {len(model.mtp)} MTP module(s); "
          f"{len(prompts)} prompts of {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    eos = None  # fixed-length outputs: both modes decode exactly --max-tokens tokens
    for temperature in (0.0, args.temperature):
        result = _run(model, prompts, args.max_tokens, temperature, args.top_p if temperature > 0 else 1.0,
                      args.seed, eos)
        print(json.dumps(result))


if __name__ == "__main__":
    main()

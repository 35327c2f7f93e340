"""MTP speculative decoding against plain latent-cache decoding, on a model trained with MTP.

The model (``bench/speculative_model_12l.json``): 12 layers and one MTP block, as V3 has one beside 61,
so a draft costs a small fraction of a verification. ``--prepare`` writes a small, very learnable corpus
(counting in English number words from random starts, ``bench/.spec_data``) and trains the model on it
with ``dsv3 train`` into ``bench/.spec_run`` (both gitignored; about 10 minutes on 2 idle cores):

    python bench/speculative.py --prepare

Then, on prompts the training never saw (documents of the same generator drawn with another seed,
``--prompt-source numbers``; ``stdlib`` takes them from the Python standard library instead), it decodes
``--max-tokens`` tokens per prompt plainly and speculatively, alternating the order so that a drifting
shared machine slows both alike, and reports the acceptance rate per draft position, tokens per
main-model forward, the medians of tokens/s and their ratio, for greedy decoding (outputs asserted
identical) and sampling (``--temperature``). ``--batch 1,4,16`` also decodes several prompts at once
(plain batched decoding against batched speculative decoding, whose rounds commit the fewest drafts any
row accepted). Where the time goes: seconds per draft and per verification, against a plain step.

    python bench/speculative.py [RUN_DIR] [--prompts 8] [--max-tokens 64] [--batch 1,4,16]

(``RUN_DIR`` defaults to ``bench/.spec_run``.) The earlier 3-layer model (``bench/speculative_model.json``,
where a draft costs half a verification) was trained with
``dsv3 train --model bench/speculative_model.json --seq-len 128 --steps 600 --run-dir runs/spec``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from dsv3.data.tokenizer import get_tokenizer
from dsv3.infer.generate import generate, load_for_generation
from dsv3.infer.speculative import SpeculativeStats, speculative_generate

HERE = Path(__file__).resolve().parent
RUN_DIR, DATA_DIR = HERE / ".spec_run", HERE / ".spec_data"
TRAIN_ARGS = [
    "--model",
    str(HERE / "speculative_model_12l.json"),
    "--seq-len",
    "128",
    "--micro-batch",
    "8",
    "--global-batch",
    "8",
    "--steps",
    "1500",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "50",
]
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10^6) in English words: 1234 -> 'one thousand two hundred thirty-four'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def counting_document(rng: random.Random) -> str:
    """'counting from N: N, N+1, ..., N+k-1.' for a random N < 100000 and 8 <= k < 40."""
    n, k = rng.randrange(0, 100000), rng.randrange(8, 40)
    return f"counting from {number_words(n)}: " + ", ".join(number_words(i) for i in range(n, n + k)) + "."


def prepare(run_dir: Path, documents: int = 4000) -> None:
    """Write the counting corpus (seed 0) and train the 12-layer model on it with ``dsv3 train``."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    corpus = DATA_DIR / "counting.jsonl"
    rng = random.Random(0)
    corpus.write_text("".join(json.dumps({"text": counting_document(rng)}) + "\n" for _ in range(documents)))
    cmd = [sys.executable, "-m", "dsv3", "train", *TRAIN_ARGS, "--data", str(corpus), "--run-dir", str(run_dir)]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)


def _prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        ids = tokenizer.encode(rng.choice(files).read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) > length:
            start = rng.randrange(0, len(ids) - length)
            out.append(ids[start : start + length])
    return out


def _counting_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """The first ``length`` tokens of ``count`` counting documents drawn with ``seed + 1`` (training used 0)."""
    rng = random.Random(seed + 1)
    out = []
    while len(out) < count:
        ids = tokenizer.encode(counting_document(rng)).ids
        if len(ids) > length:
            out.append(ids[:length])
    return out


def _decode(mode, model, x, max_tokens, temperature, top_p, seed, stats):
    gen = torch.Generator().manual_seed(seed)
    if mode == "plain":
        return generate(model, x, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, generator=gen)
    return speculative_generate(
        model, x, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, generator=gen, stats=stats
    )


def _run(model, prompts, max_tokens, temperature, top_p, seed, batch=1):
    """Plain vs speculative decoding of ``prompts`` in groups of ``batch``, interleaved; medians."""
    stats = SpeculativeStats(len(model.mtp))
    speedups, plain_tps, spec_tps, same, plain_s = [], [], [], 0, []
    groups = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    for i, group in enumerate(groups):
        x = torch.tensor(group)
        timings = {}
        for mode in ("plain", "spec") if i % 2 == 0 else ("spec", "plain"):
            started = time.perf_counter()
            out = _decode(mode, model, x, max_tokens, temperature, top_p, seed + i, stats)
            timings[mode] = (time.perf_counter() - started, out)
        new = batch * max_tokens
        plain_tps.append(new / timings["plain"][0])
        spec_tps.append(new / timings["spec"][0])
        plain_s.append(timings["plain"][0] / max_tokens)
        speedups.append(spec_tps[-1] / plain_tps[-1])
        same += torch.equal(timings["plain"][1], timings["spec"][1])
    if temperature <= 0:
        assert same == len(groups), (
            f"greedy speculative output differs from plain greedy in {len(groups) - same} groups"
        )
    return {
        "batch": batch,
        "temperature": temperature,
        "top_p": top_p,
        "acceptance_rate": stats.acceptance_rates(),
        "tokens_per_forward": stats.tokens_per_round() / batch,
        "new_tokens": stats.new_tokens,
        "plain_tokens_per_s_median": statistics.median(plain_tps),
        "speculative_tokens_per_s_median": statistics.median(spec_tps),
        "speedup_median": statistics.median(speedups),
        "identical_outputs": f"{same}/{len(groups)}",
        # one round = one draft (the MTP block and the head) + one verification forward of D+1 tokens
        "draft_ms_per_round": 1e3 * stats.draft_seconds / stats.rounds,
        "verify_ms_per_round": 1e3 * stats.verify_seconds / stats.rounds,
        "plain_ms_per_step_median": 1e3 * statistics.median(plain_s),
        "draft_share_of_round": stats.draft_seconds / (stats.draft_seconds + stats.verify_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default=str(RUN_DIR))
    parser.add_argument("--prepare", action="store_true", help="write the corpus and train the model into run_dir")
    parser.add_argument("--prompt-source", choices=("numbers", "stdlib"), default="numbers")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch", default="1", help="comma-separated prompts per call, e.g. 1,4,16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.run_dir))
        return
    torch.set_num_threads(args.threads)
    model, checkpoint = load_for_generation(args.run_dir, keep_mtp=True)
    tokenizer = get_tokenizer(str(Path(checkpoint) / "tokenizer.json"), vocab_size=model.config.vocab_size)
    batches = [int(b) for b in args.batch.split(",")]
    count = max(args.prompts, *(2 * b for b in batches))
    pick = _counting_prompts if args.prompt_source == "numbers" else _prompts
    prompts = pick(tokenizer, count, args.prompt_tokens, args.seed)
    print(
        f"checkpoint {checkpoint}: {model.num_parameters():,} parameters, {model.config.num_hidden_layers} layers, "
        f"{len(model.mtp)} MTP module(s); {len(prompts)} {args.prompt_source} prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} new tokens each, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    for temperature in (0.0, args.temperature):
        result = _run(
            model,
            prompts[: args.prompts],
            args.max_tokens,
            temperature,
            args.top_p if temperature > 0 else 1.0,
            args.seed,
        )
        print(json.dumps(result))
    for batch in batches:
        if batch > 1:
            print(
                json.dumps(
                    _run(model, prompts[: max(args.prompts, batch * 2)], args.max_tokens, 0.0, 1.0, args.seed, batch)
                )
            )


if __name__ == "__main__":
    main()

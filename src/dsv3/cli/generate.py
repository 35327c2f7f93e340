"""``dsv3 generate``: sample text from a run or checkpoint with the latent KV cache.

stdout carries only the generated text (one result per prompt, in order); statistics go
to stderr (``--speculative``) or to a ``--stats`` JSON file.
"""

from __future__ import annotations

import json
import os
import sys
import time

from dsv3.errors import ConfigError, DataError
from dsv3.utils.io import atomic_write_text
from dsv3.utils.outputs import check_output_file, json_with_keys

#: Keys every ``--stats`` document holds: an existing file with them is an earlier --stats output (replaced).
STATS_KEYS = ("prompts", "max_tokens", "temperature", "top_p", "device")


def _is_stats_file(path: str) -> bool:
    """Whether ``path`` is an earlier ``--stats`` output (replaced); any other file is refused."""
    return json_with_keys(*STATS_KEYS)(path)


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run directory or checkpoint")
    p.add_argument(
        "path", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a checkpoint"
    )
    p.add_argument("--prompt", default=None, help="text to continue (default: start of a document)")
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="one prompt per line, decoded together in one batch (prints one result per prompt)",
    )
    p.add_argument("--max-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="nucleus sampling: keep the top tokens of this probability mass (default 0.95)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument(
        "--speculative",
        choices=("none", "mtp"),
        default="none",
        help="mtp: the MTP modules draft tokens that one main-model forward verifies",
    )
    p.add_argument("--num-draft", type=int, default=None, help="drafted tokens per round (default: every MTP module)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="with --speculative, do not also time plain decoding for the speed-up",
    )
    p.add_argument(
        "--stats",
        default=None,
        metavar="FILE.json",
        help="write tokens/s, acceptance rates and per-layer expert loads here (a new file, or "
        "replacing an earlier --stats file; any other existing file is refused)",
    )
    p.add_argument(
        "--placement",
        default=None,
        metavar="FILE.json",
        help="serve with redundant experts placed by `dsv3 eplb --json` (same output)",
    )
    p.set_defaults(func=run)


def resolve_device(name: str):
    """``torch.device(name)`` when this machine has it, else a one-line ConfigError."""
    import torch  # torch-free start of `dsv3 plan` (this module builds a parser)

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name} asks for CUDA, which this machine (or torch build) does not have; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name} asks for MPS, which this machine does not have; use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported --device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            prompts = [line.rstrip("\r\n") for line in fh]
    except FileNotFoundError:
        raise DataError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts file {path}: {exc}") from None
    if not prompts:
        raise DataError(f"prompts file {path} is empty; write one prompt per line")
    return prompts


def _check_args(args, check_sampling) -> None:
    """The flags' one-line errors, before anything is loaded."""
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be positive, got {args.max_tokens}")
    check_sampling(args.temperature, args.top_p)
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.num_draft is not None and args.speculative != "mtp":
        raise ConfigError("--num-draft needs --speculative mtp")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise ConfigError(f"tokenizer file {args.tokenizer} does not exist")
    if args.prompt is not None and args.prompts_file is not None:
        raise ConfigError("--prompt and --prompts-file cannot go together; put the prompt in the file (one per line)")
    if args.stats:
        check_output_file(args.stats, "--stats", is_own=_is_stats_file, what="a dsv3 generate --stats JSON file")


def run(args) -> int:
    # torch and the tokenizers library only when the command runs: `dsv3 plan` starts without them
    import torch

    from dsv3.data.tokenizer import eos_token_id, get_tokenizer
    from dsv3.infer.generate import (
        ExpertLoadCollector,
        check_length,
        check_sampling,
        encode_prompt,
        generate_batch,
        load_for_generation,
    )

    _check_args(args, check_sampling)
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else [args.prompt or ""]
    device = resolve_device(args.device)
    speculative = args.speculative == "mtp"
    model, checkpoint = load_for_generation(args.path, use_ema=args.use_ema, device=str(device), keep_mtp=speculative)
    tok_path = args.tokenizer or os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise ConfigError(f"no tokenizer.json in {checkpoint}; pass --tokenizer")
    tokenizer = get_tokenizer(tok_path, vocab_size=model.config.vocab_size)
    eos = eos_token_id(tokenizer)
    ids = [encode_prompt(tokenizer, p, eos) for p in prompts]
    check_length(
        model, max(len(i) for i in ids), args.max_tokens, extra=(args.num_draft or len(model.mtp)) if speculative else 0
    )
    if args.placement:
        from dsv3.infer.replicate import apply_placement, read_placement

        apply_placement(model, *read_placement(args.placement))
    stats: dict = {
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "device": str(device),
    }
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with ExpertLoadCollector(model) as loads:
        if speculative:
            new = _speculative(model, ids, args, eos, gen, stats)
        else:
            started = time.perf_counter()
            new = generate_batch(
                model,
                ids,
                max_new_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                eos_id=eos,
                generator=gen,
                loads=loads,
            )
            seconds = time.perf_counter() - started
            n = sum(len(x) for x in new)
            stats.update(
                mode="batched" if len(ids) > 1 else "plain",
                new_tokens=n,
                seconds=seconds,
                tokens_per_s=n / seconds if seconds > 0 else None,
            )
    if loads.load.numel():
        stats["expert_load"] = loads.load.tolist()
    if speculative and not args.no_baseline:
        _baseline(model, ids, args, eos, stats)
    for prompt, tokens in zip(prompts, new):
        print(prompt + tokenizer.decode(tokens))
    if args.stats:
        atomic_write_text(args.stats, json.dumps(stats, indent=1) + "\n")
    if speculative:
        print(_speculative_line(stats), file=sys.stderr)
    return 0


def _speculative_line(stats: dict) -> str:
    """The stderr line of a ``--speculative mtp`` run: acceptance per draft position, tokens/s vs plain."""
    rates = ", ".join("-" if r is None else f"{r:.1%}" for r in stats["acceptance_rate"])
    line = (
        f"speculative (MTP, {stats['draft_tokens']} draft/round): acceptance {rates}, "
        f"{stats['tokens_per_round']:.2f} tokens/forward, {stats['tokens_per_s']:.1f} tokens/s"
    )
    if stats.get("baseline_tokens_per_s"):
        line += f" vs plain {stats['baseline_tokens_per_s']:.1f} tokens/s ({stats['speedup']:.2f}x)"
    return line


def _speculative(model, ids, args, eos, gen, stats) -> list[list[int]]:
    """Decode each prompt with MTP speculation, one at a time."""
    import torch  # torch-free start of `dsv3 plan`, as in run()

    from dsv3.infer.speculative import SpeculativeStats, speculative_generate

    device = model.model.embed_tokens.weight.device
    spec = SpeculativeStats(args.num_draft or len(model.mtp))
    new = []
    for prompt in ids:
        x = torch.tensor([prompt], device=device)
        out = speculative_generate(
            model,
            x,
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_id=eos,
            generator=gen,
            num_draft=args.num_draft,
            stats=spec,
        )
        tokens = out[0, len(prompt) :].tolist()
        new.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    stats.update(mode="speculative", **spec.to_dict())
    return new


def _baseline(model, ids, args, eos, stats) -> None:
    """Time plain decoding of the same prompts: ``baseline_tokens_per_s`` and ``speedup`` in ``stats``."""
    import torch  # torch-free start of `dsv3 plan`, as in run()

    from dsv3.infer.generate import generate

    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    started, n = time.perf_counter(), 0
    for prompt in ids:
        x = torch.tensor([prompt], device=device)
        out = generate(
            model,
            x,
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_id=eos,
            generator=gen,
        )
        n += out.shape[1] - len(prompt)
    seconds = time.perf_counter() - started
    stats["baseline_tokens_per_s"] = n / seconds if seconds > 0 else None
    if stats["baseline_tokens_per_s"] and stats.get("tokens_per_s"):
        stats["speedup"] = stats["tokens_per_s"] / stats["baseline_tokens_per_s"]

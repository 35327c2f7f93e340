"""``dsv3 generate``: sample text from a run or checkpoint with the latent KV cache."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run directory or checkpoint")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the top tokens of this probability mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from dsv3.errors import ConfigError
    from dsv3.infer.generate import generate_text, load_for_generation
    from dsv3.train.tokenizer import eos_token_id, get_tokenizer

    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be positive, got {args.max_tokens}")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--top-p must be in (0, 1] and --temperature non-negative")
    model, checkpoint = load_for_generation(args.path, use_ema=args.use_ema, device=args.device)
    tok_path = args.tokenizer or os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise ConfigError(f"no tokenizer.json in {checkpoint}; pass --tokenizer")
    tokenizer = get_tokenizer(tok_path, vocab_size=model.config.vocab_size)
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         eos_id=eos_token_id(tokenizer))
    print(text)
    return 0

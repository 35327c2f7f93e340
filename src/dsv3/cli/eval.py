"""``dsv3 eval``: loss and perplexity on held-out data, a passkey-retrieval probe, and mean reward / pass@k."""

from __future__ import annotations

from dsv3.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss/perplexity on held-out data and passkey retrieval of a run or checkpoint",
        description="Evaluate a run's latest checkpoint (or a checkpoint / Hugging Face directory): "
        "loss and perplexity on --data (plain text, or chat .jsonl scored on the assistant "
        "tokens), and passkey retrieval at the --passkey lengths.",
    )
    p.add_argument(
        "path",
        metavar="CKPT_OR_RUN",
        help="a run directory (its latest checkpoint), a checkpoint or a Hugging Face directory",
    )
    p.add_argument("--data", default=None, help="held-out data: text file/dir, .jsonl, .parquet, .bin, or chat .jsonl")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per scored sequence (default: min(max_position_embeddings, 1024))",
    )
    p.add_argument(
        "--passkey", default=None, metavar="LENGTHS", help="run the passkey probe at these token lengths, e.g. 1k,2k"
    )
    p.add_argument("--passkey-trials", type=int, default=10, help="probes per length (needle depths spread 0..1)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--max-batches", type=int, default=None, help="score at most this many batches")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--chat-template", default=None, help="chat template for chat data (default: the checkpoint's)")
    p.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey keys and of the samples (default 0)")
    rl = p.add_argument_group("rewards", "mean reward and pass@k of sampled completions (the GRPO measurement)")
    rl.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help='prompts .jsonl ("prompt" or "messages", plus the rewards\' columns)',
    )
    rl.add_argument(
        "--reward",
        action="append",
        default=None,
        metavar="NAME",
        help="reward function: math, code, format, module:function or path.py:function (repeatable)",
    )
    rl.add_argument(
        "--samples", type=int, default=1, metavar="K", help="samples per prompt, the k of pass@k (default 1)"
    )
    rl.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy; default 1)")
    rl.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
    rl.add_argument("--max-tokens", type=int, default=64, help="completion length limit (default 64)")
    p.set_defaults(func=run)


def run(args) -> int:
    # torch only when the command runs: `dsv3 plan` starts without it
    from dsv3.train.evaluation import evaluate_checkpoint, parse_lengths

    if (args.prompts is None) != (args.reward is None):
        raise ConfigError("--prompts and --reward go together: the rewards score the completions of the prompts")
    if args.prompts is not None:
        from dsv3.train.rl_eval import evaluate_prompts

        result = evaluate_prompts(
            args.path,
            args.prompts,
            args.reward,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_tokens,
            seed=args.seed,
            device=args.device,
        )
        print("\n".join(result.lines()))
        return 0

    report = evaluate_checkpoint(
        args.path,
        data=args.data,
        seq_len=args.seq_len,
        passkey=parse_lengths(args.passkey) if args.passkey else (),
        passkey_trials=args.passkey_trials,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        use_ema=args.use_ema,
        device=args.device,
        seed=args.seed,
    )
    print("\n".join(report.lines()))
    return 0

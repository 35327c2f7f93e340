"""``dsv3 train``: train a model (default: the tiny preset on the Python standard library)."""

from __future__ import annotations

import os

from dsv3.cli.options import add_config_arguments, overrides_from_args
from dsv3.errors import ConfigError
from dsv3.train.config import config_yaml, load_train_config
from dsv3.train.rundir import resume_config


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        usage="dsv3 train [--config FILE | --resume RUN_DIR] [--print-config] [OPTIONS]\n"
        "       dsv3 train --task grpo --init-from CKPT --data prompts.jsonl --reward NAME [OPTIONS]",
        help="train a model (no arguments: the tiny preset on the Python stdlib)",
        description="Train a DeepSeek-V3-architecture model. Every option of the run config is a flag "
        "(grouped below by its section of the run file); --config reads them from a "
        "YAML or TOML file first (sectioned, `optimizer: {lr: 1e-3}`, or flat, "
        "`lr: 1e-3`), then the flags override.",
    )
    p.add_argument(
        "--config",
        dest="config_file",
        default=None,
        metavar="FILE",
        help="YAML or TOML run configuration, sectioned or flat",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue this run from its latest checkpoint (flags override its saved config)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check the configuration as a run would (options, run directory, --resume flags, context, "
        "memory), print it as YAML and exit without training or writing anything",
    )
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # the trainer's modules (torch) are imported here, when the command runs: `dsv3 plan` starts without torch
    overrides = overrides_from_args(args)
    if args.resume is not None and args.config_file is not None:
        raise ConfigError("--resume continues a run with its saved config; drop --config (flags still override)")
    if args.print_config:  # every check of a real run first: the YAML is printed only for a run that would start
        from dsv3.train.preflight import check_run_config

        config = None if args.resume is not None else load_train_config(args.config_file, overrides)
        print(config_yaml(check_run_config(config, resume=args.resume, overrides=overrides)), end="")
        return 0

    from dsv3.train.loop import train

    if args.resume is not None:
        task = resume_config(args.resume, {}).data.task
        if task == "reward":
            raise ConfigError(f"{args.resume} is a reward-model run, which cannot be resumed; start a new one")
        if task == "grpo":
            from dsv3.train.grpo_run import train_grpo as train
        result = train(None, resume=args.resume, overrides=overrides)  # type: ignore[arg-type]
    else:
        config = load_train_config(args.config_file, overrides)
        if config.data.task == "reward":
            return _train_reward(config)
        if config.data.task == "grpo":  # GRPO (dsv3.train.grpo): prompts, rewards, rollouts
            from dsv3.train.grpo_run import train_grpo as train
        result = train(config)  # under torchrun on every rank (pp, dp, ep: dsv3.parallel.world)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 alone reports
    if result.val_losses:
        first, last = result.val_losses[0], result.val_losses[-1]
        print(f"validation loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if result.sample is not None:
        print("sample:\n" + result.sample)
    print(f"done in {result.wall_time:.0f} s: {result.run_dir} (plots: dsv3 plot {result.run_dir})")
    return 0


def _train_reward(config) -> int:
    """``--task reward``: a reward model on preference pairs (:mod:`dsv3.train.reward_model`)."""
    from dsv3.train.reward_model import train_reward_model

    result = train_reward_model(config)
    if result.val_accuracy is not None:
        print(f"held-out pairwise accuracy: {result.val_accuracy:.3f} (loss {result.val_loss:.4f})")
    print(f"reward model: {result.run_dir} (use it with --reward-model {result.run_dir})")
    return 0

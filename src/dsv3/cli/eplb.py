"""``dsv3 eplb``: place redundant expert replicas on GPUs from recorded expert loads (EPLB)."""

from __future__ import annotations

import argparse
import json

from dsv3.utils.io import atomic_write_text
from dsv3.utils.outputs import check_output_file, json_with_keys


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


#: Keys of every ``--json`` placement: an existing file with them is an earlier output (replaced).
PLACEMENT_KEYS = ("phy2log", "log2phy", "logcnt")


def register(sub) -> None:
    p = sub.add_parser(
        "eplb",
        help="place redundant experts on GPUs from recorded expert loads",
        description="Compute an expert-parallel placement with redundant experts (the deepseek-ai/"
        "EPLB interface) and print the max/mean GPU load before and after.",
    )
    p.add_argument(
        "--loads",
        required=True,
        metavar="FILE",
        help="a run's metrics.jsonl (or run directory), a `dsv3 generate --stats` file, "
        "or a JSON array [layers][experts]",
    )
    p.add_argument("--replicas", type=_positive, required=True, help="physical expert slots per layer (R)")
    p.add_argument("--nodes", type=_positive, required=True, help="server nodes (fast links within a node)")
    p.add_argument("--gpus", type=_positive, required=True, help="GPUs in all (a multiple of --nodes)")
    p.add_argument(
        "--groups",
        type=_positive,
        default=1,
        help="expert groups (n_group); hierarchical placement when they divide over the nodes",
    )
    p.add_argument(
        "--policy",
        choices=("refined", "published"),
        default="refined",
        help="refined (default: never less balanced) or published (deepseek-ai/EPLB's greedy)",
    )
    p.add_argument(
        "--json",
        metavar="OUT",
        default=None,
        help="write the placement and the loads here (a new file, or replacing an earlier eplb --json "
        "file; any other existing file is refused)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3.infer.eplb import (  # torch only when the command runs: `dsv3 plan` starts without it
        gpu_loads,
        imbalance,
        is_hierarchical,
        read_expert_loads,
        rebalance_experts,
        unreplicated_gpu_loads,
    )

    if args.json:
        check_output_file(args.json, "--json", is_own=json_with_keys(*PLACEMENT_KEYS), what="a dsv3 eplb --json file")
    weight = read_expert_loads(args.loads)
    layers, experts = weight.shape
    placements = {
        "published": rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus, policy="published")
    }
    if args.policy == "refined":
        placements["refined"] = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus)
    before = imbalance(unreplicated_gpu_loads(weight, args.gpus))
    after = {name: imbalance(gpu_loads(weight, p[0], p[2], args.gpus)) for name, p in placements.items()}
    kind = "hierarchical" if is_hierarchical(args.groups, args.nodes) else "global"
    print(
        f"{layers} layers x {experts} experts -> {args.replicas} replicas on {args.gpus} GPUs "
        f"({args.nodes} nodes, {args.groups} groups: {kind} policy)"
    )
    print("max/mean GPU load (mean over layers, worst layer):")
    print(f"  before (no redundancy)  {before.mean():.4f}  {before.max():.4f}")
    for name, value in after.items():
        print(f"  after ({name + ')':<17} {value.mean():.4f}  {value.max():.4f}")
    if args.json:
        phy2log, log2phy, logcnt = placements[args.policy]
        out = {
            "policy": args.policy,
            "hierarchical": kind == "hierarchical",
            "replicas": args.replicas,
            "nodes": args.nodes,
            "gpus": args.gpus,
            "groups": args.groups,
            "phy2log": phy2log.tolist(),
            "log2phy": log2phy.tolist(),
            "logcnt": logcnt.tolist(),
            "imbalance_before": before.tolist(),
            "imbalance_after": {name: v.tolist() for name, v in after.items()},
        }
        atomic_write_text(args.json, json.dumps(out) + "\n")
    return 0

"""EPLB placements: max/mean GPU load before and after, published algorithm vs dsv3's refined one.

Two sources of expert loads:

* a real training run's ``metrics.jsonl`` (``expert_load`` records, every ``load_every`` steps):
  placed from the whole run's loads (in sample) and from the first half's, evaluated on the
  second half (out of sample, as serving recomputes placements from recent traffic);
* skewed synthetic loads on a DeepSeek-V3-sized layer (256 experts, 8 groups, 58 MoE layers),
  log-normal with several spreads, for a hierarchical (prefill-like: 4 nodes, 32 GPUs) and a
  global (decode-like: 9 nodes, 72 GPUs) layout.

Imbalance is max/mean GPU load per layer (1 = perfect); reported as the mean over layers and the
worst layer, for no redundancy ("before"), the published deepseek-ai/EPLB algorithm and dsv3's
refined policy, all in the same run, plus the wall time of each; in sample also a lower bound for any
placement (mean over layers of max(1, largest replica load / mean GPU load)) and the refined plan's
node imbalance (its GPUs cannot be better balanced than its nodes).

    python bench/eplb.py [--run RUN_DIR] [--layers 58]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv3.infer.eplb import gpu_loads, imbalance, rebalance_experts, unreplicated_gpu_loads


def _row(name, weight, replicas, groups, nodes, gpus, eval_weight=None):
    eval_weight = weight if eval_weight is None else eval_weight
    out = {
        "case": name,
        "layers": weight.shape[0],
        "experts": weight.shape[1],
        "replicas": replicas,
        "groups": groups,
        "nodes": nodes,
        "gpus": gpus,
    }
    before = imbalance(unreplicated_gpu_loads(eval_weight, gpus))
    out["before"] = (round(float(before.mean()), 4), round(float(before.max()), 4))
    for policy in ("published", "refined"):
        started = time.perf_counter()
        phy2log, _, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)
        seconds = time.perf_counter() - started
        imb = imbalance(gpu_loads(eval_weight, phy2log, logcnt, gpus))
        out[policy] = (round(float(imb.mean()), 4), round(float(imb.max()), 4))
        out[policy + "_s"] = round(seconds, 2)
        if policy == "published":
            pub = imb
        else:
            out["refined_layers_better"] = f"{int((imb < pub - 1e-12).sum())}/{len(imb)}"
            out["refined_layers_worse"] = int((imb > pub + 1e-12).sum())
            if eval_weight is weight and groups % nodes == 0 and nodes > 1:
                # the refined plan's node imbalance: its GPUs cannot be better balanced than its nodes
                node = gpu_loads(weight, phy2log, logcnt, gpus).view(weight.shape[0], nodes, -1).sum(-1)
                out["refined_node_imbalance"] = round(float(imbalance(node).mean()), 4)
    if eval_weight is weight:
        # a lower bound for any placement: the mean, and the largest replica load when the R - E extra
        # slots go to the heaviest experts (replicate_experts' greedy is optimal for that)
        from dsv3.infer.eplb import replicate_experts

        _, _, cnt = replicate_experts(weight.double(), replicas)
        mean = weight.double().sum(-1) / gpus
        bound = torch.maximum(mean, (weight.double() / cnt).amax(-1)) / mean
        out["lower_bound"] = round(float(bound.mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a training run directory (its metrics.jsonl)")
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.run:
        records = [json.loads(line) for line in open(f"{args.run}/metrics.jsonl", encoding="utf-8") if line.strip()]
        loads = [torch.tensor(r["expert_load"], dtype=torch.float64) for r in records if r.get("expert_load")]
        whole = torch.stack(loads).sum(0)
        first, second = torch.stack(loads[: len(loads) // 2]).sum(0), torch.stack(loads[len(loads) // 2 :]).sum(0)
        e = whole.shape[1]
        print(f"run {args.run}: {len(loads)} expert_load records, {whole.shape[0]} MoE layers x {e} experts")
        for replicas, groups, nodes, gpus in ((e + e // 4, 4, 2, 4), (e + e // 2, 4, 2, 8), (2 * e, 1, 1, 8)):
            rows.append(_row("run, in sample", whole, replicas, groups, nodes, gpus))
            rows.append(_row("run, 1st half -> 2nd half", first, replicas, groups, nodes, gpus, second))
    gen = torch.Generator().manual_seed(args.seed)
    for sigma in (0.5, 1.0, 1.5):
        weight = torch.exp(sigma * torch.randn(args.layers, 256, generator=gen)) * 1000
        rows.append(_row(f"lognormal sigma={sigma}, hierarchical", weight, 288, 8, 4, 32))
        rows.append(_row(f"lognormal sigma={sigma}, global", weight, 288, 8, 9, 72))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

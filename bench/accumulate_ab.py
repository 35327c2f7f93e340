"""CPU time of forward + backward over 3 micro-batches of the ``small`` preset, plain autograd accumulation vs the
expert weights' in-place accumulation (:mod:`dsv3.memory.accumulate`), interleaved in one process.

Both models have the same values; the rounds alternate which goes first; the first round is a warm-up.
Reports ``time.process_time`` per round and the medians of rounds 2-4.

    OMP_NUM_THREADS=1 python bench/accumulate_ab.py [--seq-len 128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dsv3.config import load_preset
from dsv3.memory.accumulate import accumulate_in_place
from dsv3.model import DeepseekV3ForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_preset("small")
    plain = DeepseekV3ForCausalLM(cfg).train()
    in_place = copy.deepcopy(plain)
    accumulate_in_place(in_place)
    batches = [torch.randint(0, cfg.vocab_size, (1, args.seq_len)) for _ in range(3)]

    def run(model) -> float:
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        for ids in batches:
            (model(ids, ids).loss / len(batches)).backward()
        return time.process_time() - start

    times: dict[str, list[float]] = {"plain": [], "in_place": []}
    for r in range(args.rounds):
        order = [("plain", plain), ("in_place", in_place)]
        for name, model in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(model))
    print({k: [round(x, 3) for x in v] for k, v in times.items()})
    a, b = statistics.median(times["plain"][1:]), statistics.median(times["in_place"][1:])
    print(f"median CPU s (rounds 2-{args.rounds}): plain {a:.3f}, in place {b:.3f}, ratio {b / a:.4f}")


if __name__ == "__main__":
    main()

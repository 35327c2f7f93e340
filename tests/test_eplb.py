"""EPLB redundant-expert placement: the published algorithm's documented output, validity, balance, CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from helpers import assert_one_error, cli

from dsv3.cli import main
from dsv3.errors import ConfigError, DataError
from dsv3.infer.eplb import (
    balanced_packing,
    check_placement,
    gpu_loads,
    imbalance,
    read_expert_loads,
    rebalance_experts,
    refine_packing,
    replicate_experts,
    unreplicated_gpu_loads,
)

README_WEIGHT = torch.tensor(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
README_PHY2LOG = torch.tensor(
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
)


def test_published_policy_reproduces_the_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="published")
    assert torch.equal(phy2log, README_PHY2LOG)
    check_placement(phy2log, log2phy, logcnt, num_experts=12, num_groups=4, num_nodes=2, num_gpus=8)


def test_refined_policy_on_the_readme_example_is_valid_and_no_worse():
    pub = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="published")
    ref = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    check_placement(*ref, num_experts=12, num_groups=4, num_nodes=2, num_gpus=8)
    peak_pub = gpu_loads(README_WEIGHT, pub[0], pub[2], 8).amax(-1)
    peak_ref = gpu_loads(README_WEIGHT, ref[0], ref[2], 8).amax(-1)
    assert bool((peak_ref <= peak_pub).all())


def _gpu_loads_reference(weight, phy2log, logcnt, num_gpus):
    """Python float loop: each replica carries load / count of its expert."""
    layers, num_phy = phy2log.shape
    per_gpu = num_phy // num_gpus
    out = [[0.0] * num_gpus for _ in range(layers)]
    for layer in range(layers):
        for slot in range(num_phy):
            e = int(phy2log[layer, slot])
            out[layer][slot // per_gpu] += float(weight[layer, e]) / int(logcnt[layer, e])
    return torch.tensor(out, dtype=torch.float64)


LAYOUTS = [  # (experts, replicas, groups, nodes, gpus)
    (16, 16, 4, 2, 4),  # no redundancy, hierarchical
    (16, 20, 4, 2, 4),  # hierarchical
    (32, 40, 8, 4, 8),
    (32, 48, 8, 3, 12),  # 8 groups over 3 nodes: global policy
    (24, 32, 1, 1, 8),  # global
    (12, 24, 4, 4, 4),  # one group per node, 6 slots per GPU
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[str(x) for x in LAYOUTS])
@pytest.mark.parametrize("skew", [1.0, 4.0])
def test_placements_are_valid_and_never_less_balanced_than_published(layout, skew):
    experts, replicas, groups, nodes, gpus = layout
    gen = torch.Generator().manual_seed(experts * 7 + replicas)
    weight = (torch.rand(6, experts, generator=gen) ** skew * 1000).round()
    weight[0, :3] = 0  # idle experts too
    pub = rebalance_experts(weight, replicas, groups, nodes, gpus, policy="published")
    ref = rebalance_experts(weight, replicas, groups, nodes, gpus)
    for placement in (pub, ref):
        check_placement(*placement, num_experts=experts, num_groups=groups, num_nodes=nodes, num_gpus=gpus)
        loads = gpu_loads(weight, placement[0], placement[2], gpus)
        torch.testing.assert_close(loads, _gpu_loads_reference(weight, placement[0], placement[2], gpus))
        torch.testing.assert_close(loads.sum(-1), weight.double().sum(-1))  # every token is served once
    assert bool(
        (
            gpu_loads(weight, ref[0], ref[2], gpus).amax(-1) <= gpu_loads(weight, pub[0], pub[2], gpus).amax(-1) + 1e-9
        ).all()
    )


def test_refined_is_strictly_better_on_skewed_loads():
    gen = torch.Generator().manual_seed(0)
    weight = (torch.rand(16, 64, generator=gen) ** 4 * 1000).round()
    pub = rebalance_experts(weight, 80, 8, 2, 8, policy="published")
    ref = rebalance_experts(weight, 80, 8, 2, 8)
    imb_pub = imbalance(gpu_loads(weight, pub[0], pub[2], 8))
    imb_ref = imbalance(gpu_loads(weight, ref[0], ref[2], 8))
    assert imb_ref.mean() < imb_pub.mean() - 0.005 and bool((imb_ref <= imb_pub + 1e-12).all())
    assert imb_pub.mean() < imbalance(unreplicated_gpu_loads(weight, 8)).mean()  # redundancy helps at all


def test_replicate_experts_minimises_the_largest_replica_load():
    """Against brute force over every way to hand out the extra slots."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        w = torch.randint(1, 100, (1, 5), generator=gen).float()
        _, _, cnt = replicate_experts(w, 8)
        best = min(
            max(float(w[0, e]) / (1 + extra.count(e)) for e in range(5))
            for extra in itertools.combinations_with_replacement(range(5), 3)
        )
        assert float((w / cnt).max()) == pytest.approx(best)
        assert int(cnt.sum()) == 8


def _best_equal_split(w):
    """Brute-force optimum of packing 6 items into 2 packs of 3."""
    total = sum(w)
    return min(max(sum(w[i] for i in c), total - sum(w[i] for i in c)) for c in itertools.combinations(range(6), 3))


def test_refine_packing_never_worse_and_reaches_the_optimum_more_often():
    gen = torch.Generator().manual_seed(2)
    greedy_hits = refined_hits = 0
    for _ in range(40):
        w = torch.randint(1, 50, (1, 6), generator=gen).float()
        pack, _ = balanced_packing(w, 2)
        refined, rank = refine_packing(w, pack, 2)
        assert sorted(refined[0].tolist()) == [0, 0, 0, 1, 1, 1]  # still 3 items per pack
        assert sorted(zip(refined[0].tolist(), rank[0].tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        g = max(float(w[0][pack[0] == p].sum()) for p in range(2))
        r = max(float(w[0][refined[0] == p].sum()) for p in range(2))
        opt = _best_equal_split(w[0].tolist())
        assert opt <= r <= g
        greedy_hits += g == opt
        refined_hits += r == opt
    assert refined_hits > greedy_hits


def test_check_placement_rejects_a_group_split_over_nodes():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="published")
    broken = phy2log.clone()
    broken[0, [0, 15]] = broken[0, [15, 0]]  # exchange two slots across the nodes
    l2p = log2phy.clone()
    with pytest.raises(AssertionError):
        check_placement(broken, l2p, logcnt, num_experts=12, num_groups=4, num_nodes=2, num_gpus=8)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 4, 2, 8), "cannot hold"),
        ((16, 4, 3, 8), "do not divide over 3"),
        ((18, 4, 2, 8), "replicas do not divide"),
        ((16, 5, 2, 8), "5 groups"),
    ],
)
def test_bad_layouts_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        rebalance_experts(README_WEIGHT, *args)


def test_read_expert_loads_formats(tmp_path):
    a, b = [[1, 2], [3, 4]], [[10, 0], [0, 10]]
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 0, "val_loss": 1.0},
                {"step": 1, "expert_load": a},
                {"step": 2},
                {"step": 3, "expert_load": b},
            ]
        )
    )
    assert read_expert_loads(tmp_path / "metrics.jsonl").tolist() == [[11, 2], [3, 14]]
    assert read_expert_loads(tmp_path).tolist() == [[11, 2], [3, 14]]  # a run directory
    (tmp_path / "stats.json").write_text(json.dumps({"tokens_per_s": 3.0, "expert_load": a}))
    assert read_expert_loads(tmp_path / "stats.json").tolist() == a
    (tmp_path / "plain.json").write_text(json.dumps(b))
    assert read_expert_loads(tmp_path / "plain.json").tolist() == b
    for bad in ('{"expert_load": [[1, 2], [3]]}', "[[-1, 2]]", '{"x": 1}', "not json\n"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(DataError):
            read_expert_loads(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no expert-load file"):
        read_expert_loads(tmp_path / "missing.json")


def test_eplb_cli(tmp_path, capsys):
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps(README_WEIGHT.tolist()))
    out = tmp_path / "placement.json"
    assert (
        main(
            [
                "eplb",
                "--loads",
                str(loads),
                "--replicas",
                "16",
                "--nodes",
                "2",
                "--gpus",
                "8",
                "--groups",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "hierarchical" in text and "before (no redundancy)" in text and "after (published)" in text
    placement = json.loads(out.read_text())
    phy2log, logcnt = torch.tensor(placement["phy2log"]), torch.tensor(placement["logcnt"])
    check_placement(
        phy2log, torch.tensor(placement["log2phy"]), logcnt, num_experts=12, num_groups=4, num_nodes=2, num_gpus=8
    )
    before = imbalance(unreplicated_gpu_loads(README_WEIGHT, 8))
    assert placement["imbalance_before"] == pytest.approx(before.tolist())
    assert max(placement["imbalance_after"]["refined"]) < max(placement["imbalance_before"])


@pytest.mark.parametrize(
    "argv", [["--replicas", "10", "--nodes", "2", "--gpus", "8"], ["--replicas", "16", "--nodes", "2", "--gpus", "x"]]
)
def test_eplb_cli_bad_input_one_line(tmp_path, capsys, argv):
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps(README_WEIGHT.tolist()))
    code, _, err = cli(["eplb", "--loads", str(loads), *argv], capsys)  # argparse usage errors included
    assert_one_error(code, err)


def test_unreplicated_loads_and_imbalance_by_hand():
    w = torch.tensor([[1.0, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    loads = unreplicated_gpu_loads(w, 2)  # contiguous blocks of 3 and 2 experts
    assert loads.tolist() == [[6.0, 9.0], [0.0, 0.0]]
    assert imbalance(loads).tolist() == pytest.approx([9 / 7.5, 1.0])  # an idle layer counts as balanced

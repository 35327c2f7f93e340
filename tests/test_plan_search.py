"""The search's approximate schedule timing against full simulations, and the search's verdicts."""

import pytest

from dsv3.config import load_preset
from dsv3.plan.layout import Layout
from dsv3.plan.planner import PlanCache, make_plan
from dsv3.plan.search import search

SMALL = load_preset("small")


@pytest.mark.parametrize("schedule,pp,m", [("1f1b", 4, 30), ("zb1p", 4, 30), ("dualpipe", 4, 40), ("dualpipev", 4, 30)])
def test_approximate_timing_tracks_the_full_simulation(schedule, pp, m):
    lay = Layout(pp=pp, ep=2, dp=2, seq_len=512, global_batch=2 * m, schedule=schedule, recompute="selective")
    exact = make_plan(SMALL, lay)
    approx = make_plan(SMALL, lay, cache=PlanCache(approximate=True))
    assert approx.schedule.makespan == pytest.approx(exact.schedule.makespan, rel=0.06)
    assert approx.schedule.peak_activations == exact.schedule.peak_activations
    # the in-flight counts (and so the memory) do not depend on the approximation
    assert [d.total for d in approx.devices] == pytest.approx([d.total for d in exact.devices])


def test_search_keeps_only_layouts_that_fit_and_ranks_them():
    result = search(
        SMALL,
        16,
        2 * 2**30,
        model_name="small",
        seq_len=512,
        global_batch=64,
        grid={"schedule": ["1f1b", "dualpipev"], "recompute": ["none", "full"]},
        top=5,
    )
    fits = result.fits
    assert fits and result.rejected
    assert all(c.peak_bytes <= 2 * 2**30 and c.layout.gpus == 16 for c in fits)
    exact = [c for c in fits if c.exact]
    assert len(exact) == 5 and [c.step_time_s for c in exact] == sorted(c.step_time_s for c in exact)
    # every rejected layout says why, in one sentence
    assert all(c.reason and "\n" not in c.reason for c in result.rejected)
    oom = [c for c in result.rejected if c.peak_bytes is not None]
    assert all(c.peak_bytes > 2 * 2**30 for c in oom)
    # a shown layout is exactly what `dsv3 plan` reports for it
    best = fits[0]
    assert make_plan(SMALL, best.layout).step_time_s == pytest.approx(best.step_time_s)

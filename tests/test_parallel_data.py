"""Each data-parallel rank reads only its micro-batches of every global batch (TrainLoader.shard /
next_batches), while the global batch, its order and the resume position are those of one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_sft import chat_file, hf_dir, tok  # noqa: F401  (fixtures of the SFT test)

from dsv3.data.loader import TrainLoader
from dsv3.errors import ConfigError


class _Sequences:
    """A stand-in PackedDataset: sequence i is the row [i, i, ...]; counts the sequences read."""

    seq_len = 3

    def __init__(self, n: int) -> None:
        self.n, self.read = n, 0

    def __len__(self) -> int:
        return self.n

    def batch(self, indices):
        self.read += len(indices)
        ids = torch.as_tensor(np.asarray(indices), dtype=torch.int64)[:, None].repeat(1, self.seq_len)
        return ids, ids


def _one_process_order(seed: int, n: int, count: int) -> list[int]:
    """The reference: epoch e visits the sequences in numpy's permutation of [seed, e]."""
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(count // n + 2)])
    return order[:count].tolist()


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_ranks_read_disjoint_micro_batches_that_make_up_the_global_batch(dp):
    n, seed, micro, steps = 13, 5, 2, [4, 8, 4, 12]  # micro-batches per step (a ramp), crossing epochs
    datasets = [_Sequences(n) for _ in range(dp)]
    loaders = [TrainLoader(d, seed=seed).shard(dp, r) for r, d in enumerate(datasets)]
    want = _one_process_order(seed, n, micro * sum(steps))
    at = 0
    for n_micro in steps:
        per_rank = [ld.next_batches(n_micro, micro) for ld in loaders]
        assert all(len(b) == n_micro // dp for b in per_rank)
        # micro-batch k of the global batch is rank k % dp's (k // dp)-th
        got = [per_rank[k % dp][k // dp][0][:, 0].tolist() for k in range(n_micro)]
        assert sum(got, []) == want[at : at + n_micro * micro]
        at += n_micro * micro
        states = [ld.state_dict() for ld in loaders]
        assert all(s == states[0] for s in states)  # the same position on every rank: one process's
        assert loaders[0].sequences_seen == at
    assert [d.read for d in datasets] == [at // dp] * dp  # each rank read only its share


def test_resume_on_another_dp_continues_the_same_global_batches():
    n, seed, micro = 11, 3, 1
    one = TrainLoader(_Sequences(n), seed=seed)
    for _ in range(3):
        one.next_batches(4, micro)
    saved = json.loads(json.dumps(one.state_dict()))
    want = [b[0][:, 0].tolist() for b in one.next_batches(8, micro)]  # one process: the next global batch
    two = [TrainLoader(_Sequences(n), seed=seed).shard(2, r) for r in range(2)]
    for ld in two:
        ld.load_state_dict(saved)
    per_rank = [ld.next_batches(8, micro) for ld in two]
    assert [per_rank[k % 2][k // 2][0][:, 0].tolist() for k in range(8)] == want
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()


def test_a_batch_that_does_not_split_over_dp_is_refused():
    loader = TrainLoader(_Sequences(5), seed=0).shard(2, 1)
    with pytest.raises(ConfigError, match="cannot be split over 2 data-parallel ranks"):
        loader.next_batches(3, 1)
    with pytest.raises(ConfigError):
        loader.shard(2, 2)


# ----------------------------------------------------------------------------- sessions under torch.distributed
def _session_run(rank, opts: dict, steps: int, bad_opts: dict | None = None):
    """Per-step losses (and micro-batches this rank took) of a session stepped like dsv3.train.loop does;
    with ``bad_opts`` first the one-line error that config gets."""
    from dsv3.errors import DsV3Error
    from dsv3.train.config import TrainConfig
    from dsv3.train.session import build_session
    from dsv3.train.step import train_step

    error = None
    if bad_opts is not None:
        try:
            build_session(TrainConfig.from_dict(bad_opts), write=False, prefetch=False).close()
        except DsV3Error as exc:
            error = str(exc)
    s = build_session(TrainConfig.from_dict(opts), write=False, prefetch=False)
    losses, taken = [], []
    try:
        for _ in range(steps):
            _, gamma = s.begin_step()
            batches, _ = s.next_batches()
            taken.append(len(batches))
            losses.append(train_step(s, batches, gamma=gamma).loss)
            s.step += 1
        position = s.prefetcher.state_after
    finally:
        s.close()
    return losses, taken, position, error


@pytest.mark.timeout(90)
def test_two_ranks_with_a_batch_ramp_have_the_losses_of_one_process(train_setup, tmp_path):
    """--batch-ramp-start under torch.distributed (dp = 2): the ramp's global batches 4, 8, 12 sequences
    (2, 4, 6 micro-batches, each rank reading half of them) give one process's per-step losses and data
    position; a ramp with a step of 3 micro-batches is refused on every rank with one sentence."""
    from dist_helpers import run_ranks
    from helpers import quick_options

    opts = quick_options(
        train_setup,
        tmp_path / "run",
        micro_batch=2,
        global_batch=12,
        batch_ramp_start=4,
        batch_ramp_steps=2,
        steps=3,
        eps=1e-3,
        val_fraction=0.0,
    )
    bad = dict(opts, global_batch=8)  # batches 4, 6, 8: step 2 has 3 micro-batches
    one, one_taken, one_position, _ = _session_run(0, opts, 3)  # also builds the token caches before the spawn
    assert one_taken == [2, 4, 6]
    ranks = run_ranks(_session_run, 2, opts, 3, bad, timeout=80)
    for losses, taken, position, error in ranks:
        np.testing.assert_allclose(losses, one, rtol=1e-5, atol=1e-6)
        assert taken == [1, 2, 3] and position == one_position
        assert error is not None and "step 2 3 micro-batches" in error and "dp 2" in error
        assert error.count(". ") == 0 and "\n" not in error


@pytest.mark.timeout(120)
def test_two_ranks_of_sft_have_the_losses_of_one_process(request, tmp_path):
    """SFT (document-masked rows, assistant-only loss): micro-batches hold different numbers of loss tokens,
    so each is weighted by its share of the whole global batch's tokens, not of its rank's; 2 ranks then
    train the losses of one process."""
    from dist_helpers import run_ranks
    from test_sft import sft_options

    hf_path, chat_path = request.getfixturevalue("hf_dir"), request.getfixturevalue("chat_file")
    opts = sft_options(
        hf_path,
        chat_path,
        tmp_path / "run",
        micro_batch=1,
        global_batch=4,
        steps=2,
        eps=1e-3,
        val_fraction=0.0,
        sample_tokens=0,
    )
    one, one_taken, one_position, _ = _session_run(0, opts, 2)
    assert one_taken == [4, 4]
    for losses, taken, position, _ in run_ranks(_session_run, 2, opts, 2, timeout=100):
        np.testing.assert_allclose(losses, one, rtol=1e-5, atol=1e-6)
        assert taken == [2, 2] and position == one_position

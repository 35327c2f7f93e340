"""dsv3.utils.malloc: the fixed glibc mmap threshold gives freed large blocks back to the system."""

import sys

import pytest
import torch

from dsv3.utils.malloc import MMAP_THRESHOLD_BYTES, fix_mmap_threshold


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_threshold_returns_freed_blocks():
    assert fix_mmap_threshold() is True
    big = torch.ones(8 << 20)  # 32 MiB, mmapped: freeing it would raise a dynamic threshold to 32 MiB
    del big
    pins = []
    for _ in range(3):
        before = _rss()
        block = torch.ones(2 * MMAP_THRESHOLD_BYTES // 4)  # 8 MiB > the fixed 4 MiB threshold: its own mapping
        pins.append(torch.ones(1000))  # a small block allocated after it (in the heap it would pin the block)
        grown = _rss() - before
        del block
        assert grown > 6 << 20
        assert _rss() - before < 2 << 20  # given back on free, not kept resident in the heap

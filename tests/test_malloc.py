"""dsv3.utils.malloc: the fixed glibc mmap threshold gives freed large blocks back to the system.

The check runs in a fresh interpreter: in a pytest worker, earlier tests leave freed (resident) heap memory
that a new block may reuse, which says nothing about the threshold."""

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import torch
    from dsv3.utils.malloc import MMAP_THRESHOLD_BYTES, fix_mmap_threshold

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    assert fix_mmap_threshold() is True
    big = torch.ones(8 << 20)  # 32 MiB, mmapped: freeing it would raise a dynamic threshold to 32 MiB
    del big
    pins = []
    for _ in range(3):
        before = rss()
        block = torch.ones(2 * MMAP_THRESHOLD_BYTES // 4)  # 8 MiB > the fixed 4 MiB threshold: its own mapping
        pins.append(torch.ones(1000))  # a small block allocated after it (in the heap it would pin the block)
        grown = rss() - before
        del block
        assert grown > 6 << 20, grown
        assert rss() - before < 2 << 20, rss() - before  # given back on free, not kept resident in the heap
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.timeout(60)
def test_fixed_threshold_returns_freed_blocks():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

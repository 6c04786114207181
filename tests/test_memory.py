"""Freed memory goes back to the OS; the peak resident memory is read and reset."""

from __future__ import annotations

import sys

import pytest

from llm_embedder.memory import (peak_rss_mb, release_freed_memory, reset_peak_rss,
                                  return_free_heap)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc_trim, /proc")


def _resident_mb() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) // 1024 for line in handle
                    if line.startswith("VmRSS:"))


@linux_only
def test_freed_heap_goes_back_to_the_os():
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB of heap (under mmap's cut)
    last = blocks[-1]  # a live block at the top of the heap: freeing alone keeps the rest
    del blocks
    before = _resident_mb()
    release_freed_memory()
    assert before - _resident_mb() > 100
    assert len(last) == 64 * 1024


@linux_only
def test_free_heap_goes_back_without_a_garbage_collection():
    # What encoding calls between batches: only the allocator's trim, no gc pass.
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    last = blocks[-1]
    del blocks  # freed by reference counting, no collection needed
    before = _resident_mb()
    return_free_heap()
    assert before - _resident_mb() > 100
    return_free_heap()  # the libc handle is looked up once and reused
    assert len(last) == 64 * 1024


@linux_only
def test_peak_is_reset_and_then_counts_only_what_ran_after():
    big = bytearray(300 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # touch every page: resident
    high = peak_rss_mb()
    del big
    release_freed_memory()
    assert reset_peak_rss()
    after = peak_rss_mb()
    assert high - after > 250
    assert abs(after - _resident_mb()) < 50

"""pddreg._heap: freed host memory kept for reuse during a registration (glibc)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import pddreg._heap as H


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> _MallInfo2 | None:
    lib = H._glibc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    lib.mallinfo2.restype = _MallInfo2
    return lib.mallinfo2()


def _mmapped_blocks() -> int | None:
    """glibc's count of blocks served by mmap (None without ``mallinfo2``)."""
    info = _mallinfo()
    return None if info is None else int(info.hblks)


def test_large_buffers_come_from_the_heap_inside_and_from_mmap_outside():
    if _mmapped_blocks() is None:
        pytest.skip("needs glibc with mallinfo2")
    n = 48 * 2**20 // 4  # above glibc's largest mmap threshold (32 MiB)
    before = _mmapped_blocks()
    with H.reuse_freed_memory():
        x = torch.empty(n)
        inside = _mmapped_blocks()
        del x
    # outside, a block larger than all the heap's free memory (which earlier tests may have
    # left in pieces large enough for 48 MiB) must come from mmap
    free = int(_mallinfo().fordblks)
    outside_x = torch.empty(max(n, (free + 2**25) // 4))
    outside = _mmapped_blocks()
    del outside_x
    assert inside == before
    assert outside == before + 1
    assert H._depth == 0


def test_nesting_threads_and_decorator_restore_the_depth():
    calls = []

    @H.reuse_freed_memory()
    def work(k: int) -> int:
        calls.append(H._depth)
        with H.reuse_freed_memory():
            calls.append(H._depth)
        return k * 2

    assert work(3) == 6
    if H._glibc() is not None:
        assert calls == [1, 2]
    assert H._depth == 0
    with pytest.raises(RuntimeError):
        with H.reuse_freed_memory():
            raise RuntimeError("inside")
    assert H._depth == 0


def test_no_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(H, "_libc", None)
    with H.reuse_freed_memory():
        assert H._depth == 0
        y = np.ones(1000).sum()
    assert y == 1000.0


def test_register_runs_inside_it(monkeypatch):
    import pddreg
    import pddreg.api as api

    seen = []
    orig = api.make_register_fn

    def spy(*a, **k):
        seen.append(H._depth)
        return orig(*a, **k)

    monkeypatch.setattr(api, "make_register_fn", spy)
    img = np.random.default_rng(0).random((24, 28)).astype(np.float32)
    pddreg.register(img, img, method="mind", affine="off")
    assert seen and (seen[0] == 1 or H._glibc() is None)
    assert H._depth == 0

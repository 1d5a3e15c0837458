"""Memory modes of the ONNX Runtime session: the arena or not, and glibc's mmap threshold for `lean`."""

import ctypes

import numpy as np
import pytest

from sa_export.core.errors import EnvironmentProblem
from sa_export.runtime import memory
from sa_export.runtime.memory import LEAN_MMAP_THRESHOLD, use_memory_mode


def test_only_arena_keeps_onnx_runtimes_arena():
    assert use_memory_mode("arena") is True
    assert use_memory_mode("system") is False
    with pytest.raises(ValueError, match="one of arena, system, lean"):
        use_memory_mode("pool")


def test_lean_sets_glibcs_mmap_threshold(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: Libc())
    assert use_memory_mode("lean") is False
    assert calls == [(-3, LEAN_MMAP_THRESHOLD)]  # M_MMAP_THRESHOLD


def test_lean_without_mallopt_is_an_environment_problem(monkeypatch):
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: object())  # a C library without mallopt (musl)
    with pytest.raises(EnvironmentProblem, match="glibc"):
        use_memory_mode("lean")


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_release_free_memory_gives_freed_heap_pages_back():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MB in blocks small enough for the heap, touched; all freed but the last, which
    # keeps glibc from trimming the heap's top on its own.
    blocks = [libc.malloc(4096) for _ in range(16384)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    for block in blocks[:-1]:
        libc.free(block)
    before = _rss()
    assert memory.release_free_memory() is True
    assert before - _rss() > 32 * 2**20
    libc.free(blocks[-1])


def test_release_free_memory_without_malloc_trim_does_nothing(monkeypatch):
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: object())  # not glibc
    assert memory.release_free_memory() is False


def test_every_mode_computes_the_same_logits(genai_tiny_llama):
    from sa_export.runtime import SAModel

    ids = np.random.default_rng(0).integers(0, 100, (1, 24))
    mask = np.ones_like(ids)
    logits = {}
    for mode in ("arena", "system", "lean"):
        model = SAModel(genai_tiny_llama, 1, memory=mode)
        logits[mode], _, _ = model.prefill(ids, mask, model.empty_cache(1, 24), 8, all_logits=True)
    assert np.array_equal(logits["arena"], logits["system"]) and np.array_equal(logits["arena"], logits["lean"])
    assert ctypes.CDLL(None).mallopt  # this machine's libc is glibc: lean ran for real above

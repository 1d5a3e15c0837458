"""Where a session's working memory comes from, and whether it goes back to the system.

ONNX Runtime's CPU arena keeps every block it has grown to and reuses them: fast, but
its peak is the live memory plus whatever the order of allocations left unusable, and
that part differs from graph to graph (and from run to run). An 8000-token prefill of
the demo model in chunks of 512 (int4, `benchmarks.prefill_memory --memory arena` and
`lean`) held 22 MiB (baseline) and 57 MiB (SA, identity or calibrated maps) more with
the arena than in `lean` mode.
Without the arena, glibc's malloc serves large blocks from its heap, which fragments
too, unless large blocks get mappings of their own: freed, they are unmapped at once,
and the peak is what the graph holds live.
"""

from __future__ import annotations

import ctypes

from sa_export.core.errors import EnvironmentProblem

MEMORY_MODES = {
    "arena": "ONNX Runtime's CPU arena (fastest; keeps what it has grown to)",
    "system": "no arena: the C library's malloc as configured",
    "lean": "no arena, and blocks of 256 KiB or more mapped on their own and given back when freed "
            "(the least peak memory, but prefill and long-context decode are slower; glibc only, process-wide)",
}
LEAN_MMAP_THRESHOLD = 256 * 1024  # below this glibc's heap keeps small blocks, which are fast to reuse
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _glibc_function(name: str):
    """A function of glibc's malloc (mallopt, malloc_trim) from this process, or None (musl, no libc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def use_memory_mode(mode: str) -> bool:
    """Prepare the process for ``mode``; returns whether ONNX Runtime's arena is to be used.

    ``lean`` sets glibc's mmap threshold, which also stops glibc from raising it on its own
    (it does that each time a mapped block is freed, after which such blocks come from the
    heap again). It applies to the whole process: every later large allocation is mapped."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: one of {', '.join(MEMORY_MODES)}")
    if mode == "lean":
        mallopt = _glibc_function("mallopt")
        if mallopt is None or mallopt(_M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD) != 1:
            raise EnvironmentProblem("--memory lean needs glibc's malloc (mallopt); use --memory system or arena")
    return mode == "arena"


def release_free_memory() -> bool:
    """Give the pages that the C library's malloc holds free back to the system (glibc's
    malloc_trim; False where there is none).

    Loading a session parses the model and prepacks its weights, then frees the parsed
    copy; glibc keeps most of what was freed, and how much varies from process to process.
    Given back, every later peak is that much lower, and the same in every process
    (`benchmarks.prefill_memory` prints the RSS after loading)."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def _status_bytes(field: str) -> int | None:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes; None without procfs."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_rss() -> int | None:
    """This process's resident memory now (VmRSS); None without procfs."""
    return _status_bytes("VmRSS")


def own_peak_rss() -> int:
    """This process's high-water mark (VmHWM): ru_maxrss would include what a child inherits."""
    import resource

    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

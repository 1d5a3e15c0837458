"""Where a session's working memory comes from, and whether it goes back to the system.

ONNX Runtime's CPU arena keeps every block it has grown to and reuses them: fast, but
its peak is the live memory plus whatever the order of allocations left unusable, and
that part differs from graph to graph (and from run to run). An 8000-token prefill of
the demo model in chunks of 512 (int4, `benchmarks.prefill_memory --memory arena` and
`lean`) held 50 MB (baseline), 77 MB (SA, identity maps) and 131 MB (SA, calibrated
maps) more with the arena than in `lean` mode.
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


def use_memory_mode(mode: str) -> bool:
    """Prepare the process for ``mode``; returns whether ONNX Runtime's arena is to be used.

    ``lean`` sets glibc's mmap threshold, which also stops glibc from raising it on its own
    (it does that each time a mapped block is freed, after which such blocks come from the
    heap again). It applies to the whole process: every later large allocation is mapped."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: one of {', '.join(MEMORY_MODES)}")
    if mode == "lean":
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is None or mallopt(_M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD) != 1:
            raise EnvironmentProblem("--memory lean needs glibc's malloc (mallopt); use --memory system or arena")
    return mode == "arena"


def release_free_memory() -> bool:
    """Give the pages that the C library's malloc holds free back to the system (glibc's
    malloc_trim; False where there is none).

    Loading a session parses the model and prepacks its weights, then frees the parsed copy,
    and how much of that glibc keeps mapped varies from process to process: the int4 demo
    model held 225 or 245 MB after loading, by chance. Trimmed, it holds the lower figure
    every time, and every later peak is that much lower."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def own_peak_rss() -> int:
    """This process's high-water mark (VmHWM): ru_maxrss would include what a child inherits."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

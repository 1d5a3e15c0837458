"""Termination signals handled like Ctrl-C.

`timeout`, CI cancellation and service managers stop a process with SIGTERM, and a
closed terminal sends SIGHUP. Python's default for both is to die at once, which
skips every `finally` and leaves temporary output behind; raising an exception
instead unwinds through them.
"""

from __future__ import annotations

import contextlib
import signal

from sa_export.core.errors import Terminated

HANDLED = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _raise_terminated(signum, frame):
    _received.append(signum)
    raise Terminated(signum)


def raise_if_terminated() -> None:
    """Raise again for a signal whose exception a library caught and dropped: called at step
    boundaries and before output is moved into place."""
    if _received:
        raise Terminated(_received[-1])


@contextlib.contextmanager
def signals_as_interrupts():
    """Within the block, SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt)."""
    _received.clear()
    previous = {}
    for sig in HANDLED:
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except ValueError:  # not the main thread: leave the defaults
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

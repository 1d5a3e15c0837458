"""One model per process, for timing two models side by side.

Two ONNX Runtime sessions in one process do not run at one speed: in an A/A run (a graph
against a copy of itself) the session created first was up to 1.4% slower, and a third
session created beside them moved the two by far more. No interval over pairs of steps
can see such a bias. So each model lives in a process of its own, and the bench process
only says which of them takes its next step: never both at once, as before.

The workers are spawned, not forked: a fork would copy the parent's ONNX Runtime and
thread-pool state into the child.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from sa_export.core import errors
from sa_export.runtime.memory import own_peak_rss

_START_METHOD = "spawn"


def decode_inputs(model, batch: int, context: int, seed: int):
    """A decode step at ``context`` positions: context - 1 cached, one new token.
    Shared-buffer models get buffers of exactly ``context`` positions, as generate allocates."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cache = model.empty_cache(batch, context)
    length = context if model.shared_buffer else context - 1
    for name in cache:
        cache[name] = rng.standard_normal((batch, cache[name].shape[1], length, model.head_dim)).astype(model.cache_dtype)
    ids = rng.integers(0, 100, (batch, 1))
    mask = np.ones((batch, context), np.int64)
    return ids, mask, cache


def decode_step(model, batch: int, context: int, seed: int):
    """A callable that times one decode step on fixed inputs."""
    ids, mask, cache = decode_inputs(model, batch, context, seed)

    def step() -> float:
        start = time.perf_counter()
        model.forward(ids, mask, cache)
        return time.perf_counter() - start

    return step


def prefill_step(model, tokens: int, chunk: int | None, seed: int):
    """A callable that times the prefill of one ``tokens``-token prompt in chunks of ``chunk``
    (None: one call), each time into a fresh cache."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, 100, (1, tokens))
    mask = np.ones_like(ids)

    def step() -> float:
        cache = model.empty_cache(1, tokens)
        start = time.perf_counter()
        model.prefill(ids, mask, cache, chunk, all_logits=False)
        return time.perf_counter() - start

    return step


_JOBS = {"decode": decode_step, "prefill": prefill_step}


def _serve(conn, out_dir: str, threads: int | None, memory: str) -> None:
    """The worker: load the model, then run what the bench process asks, one message at a time."""
    import signal

    from sa_export.runtime import SAModel

    # Ctrl-C reaches the whole process group: the bench process handles it and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def failure(error: BaseException):
        return ("error", (type(error).__name__, str(error)))

    try:
        model = SAModel(out_dir, threads, spin=False, memory=memory)
    except Exception as error:
        conn.send(failure(error))
        return
    conn.send(("ok", None))
    step = None
    try:
        while True:
            command, args = conn.recv()
            if command == "stop":
                conn.send(("ok", own_peak_rss()))
                return
            try:
                if command == "step":
                    reply = ("ok", step())
                else:
                    step = None  # the previous inputs go before the next are made
                    step, reply = _JOBS[command](model, *args), ("ok", None)
            except Exception as error:
                reply = failure(error)
            conn.send(reply)
    except (EOFError, OSError):  # the bench process has gone
        return


def _raise(name: str, message: str, out_dir: str):
    """A worker's error, as the same sa-export error type where it is one."""
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, errors.SAExportError) and kind.__init__ is errors.SAExportError.__init__:
        raise kind(message)
    raise errors.UsageError(f"{out_dir}: {name}: {message}")


class TimedModel:
    """A model loaded in a process of its own. ``load("decode", batch, context, seed)`` or
    ``load("prefill", tokens, chunk, seed)`` prepares a job; ``step()`` runs it once and
    returns its time in seconds; ``close()`` returns the process's peak RSS."""

    def __init__(self, out_dir: str | Path, threads: int | None, memory: str = "arena"):
        self.out_dir = Path(out_dir)
        context = multiprocessing.get_context(_START_METHOD)
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(out_dir), threads, memory), daemon=True)
        self._process.start()
        child.close()
        self._ready = False

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise errors.UsageError(f"the process that runs {self.out_dir} ended (exit {self._process.exitcode})") from None
        if status == "error":
            _raise(*value, str(self.out_dir))
        return value

    def wait_ready(self) -> None:
        if not self._ready:
            self._reply()
            self._ready = True

    def load(self, job: str, *args) -> None:
        self.wait_ready()
        self._conn.send((job, args))
        self._reply()

    def step(self) -> float:
        self._conn.send(("step", ()))
        return self._reply()

    def close(self, graceful: bool = True) -> int | None:
        """Stop the worker; its peak RSS in bytes (None if it had ended, or ``graceful`` is
        False: then it is terminated at once, even in the middle of a step)."""
        peak = None
        if graceful and self._process.is_alive() and self._ready:
            try:
                self._conn.send(("stop", ()))
                peak = self._reply()
            except (OSError, errors.SAExportError):
                pass
            self._process.join(timeout=10)
        if self._process.is_alive():  # still loading, or stuck: nothing of it is needed
            self._process.terminate()
        self._process.join()
        self._conn.close()
        return peak


class TimedPair:
    """The SA model and its baseline, each in its own process (both in one memory mode), loaded in parallel."""

    def __init__(self, sa_dir: str | Path, base_dir: str | Path, threads: int | None, memory: str = "arena"):
        self.sa = TimedModel(sa_dir, threads, memory)
        try:
            self.base = TimedModel(base_dir, threads, memory)
            self.sa.wait_ready()
            self.base.wait_ready()
        except BaseException:
            self.sa.close(graceful=False)
            if hasattr(self, "base"):
                self.base.close(graceful=False)
            raise
        self.peak_rss: dict[str, int | None] = {}

    def load(self, job: str, sa_args: tuple, base_args: tuple) -> None:
        self.sa.load(job, *sa_args)
        self.base.load(job, *base_args)

    def close(self, graceful: bool = True) -> None:
        self.peak_rss = {"sa": self.sa.close(graceful), "base": self.base.close(graceful)}

    def __enter__(self) -> TimedPair:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # After a failure or an interrupt nothing more is measured: the workers end at once.
        self.close(graceful=exc_type is None)

"""Each model of a timed pair in a process of its own: steps on demand, errors as one line, clean shutdown."""

import multiprocessing
import os

import pytest

from sa_export.core.errors import UsageError
from sa_export.stages.timing_worker import TimedModel, TimedPair


def test_each_model_runs_in_its_own_process_and_reports_its_peak(genai_tiny_llama):
    with TimedPair(genai_tiny_llama, genai_tiny_llama, threads=1) as pair:
        pids = {pair.sa._process.pid, pair.base._process.pid}
        assert len(pids) == 2 and os.getpid() not in pids
        pair.load("decode", (2, 16, 0), (2, 16, 1))
        assert pair.sa.step() > 0 and pair.base.step() > 0
        pair.load("prefill", (12, 4, 1), (12, 4, 1))  # a new job replaces the decode inputs
        assert pair.sa.step() > 0 and pair.base.step() > 0
    assert pair.peak_rss["sa"] > 10 * 2**20 and pair.peak_rss["base"] > 10 * 2**20
    assert not pair.sa._process.is_alive() and not pair.base._process.is_alive()


def test_a_model_that_cannot_load_is_one_usage_error_and_stops_the_other(genai_tiny_llama, tmp_path):
    with pytest.raises(UsageError) as raised:
        TimedPair(genai_tiny_llama, tmp_path, threads=1)
    assert str(tmp_path) in str(raised.value) and "\n" not in str(raised.value)
    assert not multiprocessing.active_children()  # the SA model's process was stopped too


def test_a_failing_job_is_reported_and_the_worker_keeps_serving(genai_tiny_llama):
    model = TimedModel(genai_tiny_llama, threads=1)
    try:
        with pytest.raises(UsageError, match="KeyError"):
            model.load("no-such-job")
        model.load("decode", 1, 8, 0)
        assert model.step() > 0
    finally:
        assert model.close() > 0


def test_an_interrupt_ends_both_workers_at_once(genai_tiny_llama):
    with pytest.raises(KeyboardInterrupt):
        with TimedPair(genai_tiny_llama, genai_tiny_llama, threads=1) as pair:
            pair.load("decode", (1, 8, 0), (1, 8, 1))
            raise KeyboardInterrupt
    assert pair.peak_rss == {"sa": None, "base": None}  # terminated, not asked to stop
    assert not multiprocessing.active_children()

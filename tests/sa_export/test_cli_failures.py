"""Failures from outside the input: signals, a race to one OUT, a full disk, and every typed error.

Each ends in one line on stderr, the documented exit code and nothing left beside OUT.
"""

import resource
import signal
import subprocess
import sys
import time

import pytest

from sa_export.core import errors
from tests.helpers import leftovers, run_cli


def _convert(model, out, *extra, **popen):
    command = [sys.executable, "-m", "sa_export.cli", "convert", str(model), "--span", "3-4", "-o", str(out), "--no-check", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _error_lines(stderr: str) -> list[str]:
    """The error lines of stderr (progress lines of finished steps come before them)."""
    return [line for line in stderr.splitlines() if not line.startswith("✓")]


def _wait_for_partial(out, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if list(out.parent.glob(f".{out.name}.partial-*")):
            return
        time.sleep(0.05)
    pytest.fail(f"convert never started writing: {process.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_removes_the_partial_output(sig, tiny_llama, tmp_path):
    out = tmp_path / "out"
    process = _convert(tiny_llama, out, "--no-export-cache")  # a kept export would end the convert before the signal
    _wait_for_partial(out, process)
    time.sleep(1.0)  # into the export
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr
    assert f"terminated by {sig.name}" in stderr and "Traceback" not in stderr
    assert leftovers(out) == []


def test_two_converts_racing_to_one_out_end_0_and_2_with_one_complete_out(tiny_llama, tmp_path):
    out = tmp_path / "out"
    # Both export (a kept export would let the first end before the second checks OUT).
    first, second = _convert(tiny_llama, out, "--no-export-cache"), _convert(tiny_llama, out, "--no-export-cache")
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert len(_error_lines(loser)) == 1 and "appeared while this run worked" in _error_lines(loser)[0], loser
    assert leftovers(out) == [out]
    assert run_cli("check", out).exit_code == 0


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama, tmp_path):
    """A file-size limit fails writes with EFBIG, as a full disk fails them with ENOSPC."""
    out = tmp_path / "out"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    process = _convert(tiny_llama, out, preexec_fn=limit_file_size)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert len(_error_lines(stderr)) == 1, stderr
    assert f"no room to write {out}" in stderr and "needed" in stderr and "Traceback" not in stderr, stderr
    assert leftovers(out) == []


def test_an_out_under_a_file_is_one_line(tiny_llama, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli("convert", tiny_llama, "--span", "3-4", "-o", tmp_path / "file" / "out", "--no-check")
    assert result.exit_code == 2 and "file" in result.stderr and result.stderr.count("\n") == 1


TYPED_ERRORS = {
    errors.UsageError("bad"): 2,
    errors.PlanError("bad plan"): 2,
    errors.AttentionPatternError(3, "odd block"): 2,
    errors.DiskFull("no room"): 2,
    errors.EnvironmentProblem("no gpu"): 3,
    errors.CheckFailed("out of tolerance"): 1,
    errors.EngineBuildError("no engine"): 1,
    ValueError("an unexpected one"): 1,
    errors.UsageError("a message with [brackets] stays as it is"): 2,
}


@pytest.mark.parametrize("error", TYPED_ERRORS, ids=lambda e: f"{type(e).__name__}-{str(e)[:12]}")
def test_every_error_type_reaches_the_user_as_one_line(error, tiny_llama, tmp_path, monkeypatch):
    def fail(request):
        raise error

    monkeypatch.setattr("sa_export.stages.convert.convert", fail)
    result = run_cli("convert", tiny_llama, "--span", "3-4", "-o", tmp_path / "out")
    assert result.exit_code == TYPED_ERRORS[error]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(error) in result.stderr

import errno
import os

import pytest

from sa_export.core.atomic import atomic_directory
from sa_export.core.errors import DiskFull, UsageError
from tests.helpers import leftovers


def test_failure_inside_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "half.onnx").write_bytes(b"x")
            raise KeyboardInterrupt
    assert leftovers(out) == []


def test_failed_overwrite_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old"]
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert leftovers(out) == [out]


def test_an_out_that_appears_meanwhile_is_kept_and_the_new_work_removed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="appeared while this run worked"):
        with atomic_directory(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()  # another process finished first
            (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert leftovers(out) == [out]


def test_an_empty_out_that_appears_meanwhile_is_not_replaced_either(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="appeared"):
        with atomic_directory(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
    assert list(out.iterdir()) == []


def test_a_full_disk_inside_becomes_one_line_naming_out_and_the_space_needed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DiskFull) as caught:
        with atomic_directory(out, needed_bytes=lambda: 3 << 20) as tmp:
            (tmp / "part").write_bytes(b"x" * 10)
            raise RuntimeError("save failed") from OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert str(out) in message and "about 3.0 MiB needed" in message and "\n" not in message
    assert leftovers(out) == []


def test_an_unwritable_parent_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UsageError, match="cannot write"):
            with atomic_directory(parent / "out"):
                pass
    finally:
        parent.chmod(0o700)


def test_overwrite_replaces_only_an_earlier_output_that_holds_no_input(tmp_path):
    from sa_export.core.atomic import refuse_to_replace

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="did not write"):
        refuse_to_replace(model, True, "sa_manifest.json")
    (model / "sa_manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="which this run reads"):
        refuse_to_replace(model, True, "sa_manifest.json", [model / "config.json"])
    with pytest.raises(UsageError, match="which this run reads"):
        refuse_to_replace(tmp_path, True, "sa_manifest.json", [model])
    refuse_to_replace(model, True, "sa_manifest.json", [tmp_path / "elsewhere.txt", None])
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_to_replace(empty, True, "sa_manifest.json", [model])
    with pytest.raises(UsageError, match="already exists"):
        refuse_to_replace(empty, False, "sa_manifest.json")

import pytest

from sa_export.core.atomic import atomic_directory
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

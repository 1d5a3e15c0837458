"""Atomic output directories: build in a sibling temp dir, rename into place at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sa_export.core.errors import UsageError


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; choose another -o or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory; choose another -o")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    On any failure or interrupt the temporary directory is removed and an existing
    ``out`` is left as it was. With ``overwrite``, the old ``out`` is moved aside and
    deleted only after the new one is in place.
    """
    out = Path(out).absolute()
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; OUT gets the usual permissions
    try:
        yield tmp
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(backup / out.name)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write next to the destination, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """JSON, indented, written atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())

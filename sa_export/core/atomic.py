"""Atomic output: build in a sibling temp dir (or file), rename into place at the end.

A failure, an interrupt or a termination signal (see `signals`) removes the temporary
work and leaves an existing OUT as it was. Without --overwrite, an OUT that appears
while the work runs (another process racing to the same path) is never replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from sa_export.core.errors import DiskFull, UsageError
from sa_export.core.signals import raise_if_terminated

# Errors that mean "this path cannot take the bytes": full, over quota, read-only, or over a file-size limit.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_RENAME_NOREPLACE = 1  # linux/fs.h


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; choose another -o or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory; choose another -o")


def refuse_to_replace(out: Path, overwrite: bool, marker: str, inputs=()) -> None:
    """``refuse_existing``, and with --overwrite, refuse an OUT that this command did not write
    (no ``marker`` file in it, and not empty) or that is, or holds, one of this run's
    ``inputs``: --overwrite deletes the old OUT, and must never take a model or text with it."""
    refuse_existing(out, overwrite)
    if not out.exists():
        return
    replaced = out.resolve()
    for path in inputs:
        if path is not None and Path(path).exists() and (Path(path).resolve() == replaced or replaced in Path(path).resolve().parents):
            raise UsageError(f"--overwrite would delete {path}, which this run reads, with {out}; choose another -o")
    if not (out / marker).is_file() and any(out.iterdir()):
        raise UsageError(f"{out} holds files that sa-export did not write (it has no {marker}); --overwrite replaces only an earlier output: choose another -o")


def nearest_existing_parent(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists, which may be a file: what a write there meets."""
    return next(folder for folder in Path(path).absolute().parents if folder.exists())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def disk_error(exc: OSError, out: Path, written: int = 0, needed: int | None = None) -> UsageError:
    """One line for a write that the file system refused, naming the path and the space needed."""
    if exc.errno in _NOT_WRITABLE:
        return UsageError(f"cannot write {out}: {os.strerror(exc.errno)} ({exc.filename or out.parent}); choose another -o")
    try:
        free = f", {_human(shutil.disk_usage(out.parent).free)} free"
    except OSError:
        free = ""
    need = f"about {_human(needed)} needed" if needed else f"more than the {_human(written)} written when it failed"
    # numpy and protobuf report a failed write without an errno: say what is needed all the same.
    cause = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    error = DiskFull if exc.errno in _NO_ROOM else UsageError
    return error(f"no room to write {out} ({cause}): {need}{free}; nothing was kept")


def _disk_cause(exc: BaseException | None) -> OSError | None:
    """The OSError of a full or unwritable file system behind ``exc`` (libraries re-raise it as
    their own error), or an OSError without errno, which is how numpy reports a failed write."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in _NO_ROOM | _NOT_WRITABLE or exc.errno is None):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _rename_no_replace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST when ``dst`` exists, with no window between check and rename.

    Python's os.rename silently replaces an empty directory; renameat2(RENAME_NOREPLACE)
    is the kernel's answer and has no stdlib binding, hence ctypes. Elsewhere: check, then rename.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # the file system does not support the flag
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False, needed_bytes=None):
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    On any failure or interrupt the temporary directory is removed and an existing
    ``out`` is left as it was. With ``overwrite``, the old ``out`` is moved aside and
    deleted only after the new one is in place. ``needed_bytes`` (a callable) estimates
    the space the work needs, for the message when the disk fills.
    """
    out = Path(out).absolute()
    refuse_existing(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; OUT gets the usual permissions
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise disk_error(exc, out) from None
        blocker = nearest_existing_parent(out)
        if not blocker.is_dir():
            raise UsageError(f"cannot create {out}: {blocker} is a file, not a folder; choose another -o") from None
        raise UsageError(f"cannot create {out}: {exc.strerror or exc} ({exc.filename or out.parent}); choose another -o") from None
    try:
        try:
            yield tmp
        except Exception as exc:
            cause = _disk_cause(exc)
            if cause is not None:
                raise disk_error(cause, out, tree_bytes(tmp), needed_bytes() if needed_bytes else None) from None
            raise
        raise_if_terminated()
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not overwrite:
        try:
            _rename_no_replace(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UsageError(
                    f"output {out} appeared while this run worked (another process?); it was left as it is and this "
                    "run's output removed: pass --overwrite to replace it"
                ) from None
            raise disk_error(exc, out) from None
        return
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(backup / out.name)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)


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

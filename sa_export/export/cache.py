"""Exported unshared graphs, kept for the next convert of the same model.

The export is a convert's longest step that depends on nothing the user varies between
converts of one model (SmolLM2's dynamo export: 68.4 s on 2 cores; the sharing passes
that follow take seconds). So the exported graph is kept under the cache directory
(``SA_EXPORT_CACHE``, ``~/.cache/sa-export`` by default), in ``exports/KEY``, and a
convert or a bench baseline with the same key loads it instead of exporting.

The key is a digest of everything the export reads: the content of every file of the
model directory (not its path or dates: a checkpoint saved again in place is a new key),
the exporter and its options, the versions of the packages that export, and the source
of sa-export's export and loading code. A hit is then the graph the export would have
written; parity against PyTorch still runs after it, as after an export.

Keeping is best-effort: a cache that cannot take the graph (not writable, on another file
system than OUT, over its limit) says so in a line and the convert goes on. The export is
moved into a temporary sibling of its entry and renamed into place, so a reader never
sees half an entry; the least recently used are removed past ``SA_EXPORT_CACHE_EXPORTS_GB``
(8 by default).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

import onnx_ir as ir

from sa_export.core.atomic import tree_bytes
from sa_export.core.errors import UsageError
from sa_export.core.progress import console, step
from sa_export.export.base import Exporter, ExportOptions
from sa_export.export.onnx_io import MODEL_FILE, load_onnx
from sa_export.hf.models import ModelSource, cache_dir

EXPORTS = "exports"
DEFAULT_LIMIT_GB = 8.0
LARGE_MODEL_BYTES = 4 << 30  # about 4 s of hashing on the CPU that exports
# Packages whose versions change what an export writes.
_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime-genai", "sa-export")
# sa-export's own code an export runs: the exporters and the model loading.
_CODE = (Path(__file__).parent, Path(__file__).parents[1] / "hf")


def file_digest(path: Path) -> str:
    # The content every time, not sizes and dates: SmolLM2's 540 MB take under a second.
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def model_digest(path: Path) -> str:
    """A digest of the content of every file of a model directory (or of one file)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(json.dumps([(p.name, file_digest(p)) for p in files]).encode()).hexdigest()


def source_digests(paths) -> list[tuple[str, str]]:
    """(name, digest) of each Python file of ``paths`` (folders, or files named alone), in path order."""
    files = sorted(p for root in paths for p in ([root] if root.is_file() else root.glob("*.py")))
    return [(p.name, file_digest(p)) for p in files]


def mark_used(entry: Path) -> None:
    """Recently used: the last entry ``evict_least_recent`` removes."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def export_key(source: ModelSource, exporter: Exporter, options: ExportOptions) -> str:
    parts = {
        "model": model_digest(source.path),
        "exporter": exporter.name,
        "options": [options.precision, exporter.resolve_opset(options.opset), options.accept_unknown_config_keys],
        "packages": {package: _version(package) for package in _PACKAGES},
        "code": source_digests(_CODE),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def limit_bytes() -> int:
    value = os.environ.get("SA_EXPORT_CACHE_EXPORTS_GB", str(DEFAULT_LIMIT_GB))
    try:
        return max(0, int(float(value) * 2**30))
    except ValueError:
        raise UsageError(f"SA_EXPORT_CACHE_EXPORTS_GB={value!r} is not a size in GiB (8 by default; 0 keeps no export)") from None


def export_graph(
    exporter: Exporter, source: ModelSource, options: ExportOptions, export_dir: Path, eager_fp32_model=None,
    use_cache: bool = True, timings: dict | None = None,
) -> ir.Model:
    """The unshared graph of ``source``: loaded from the cache when the same key was
    exported before, else exported (into ``export_dir``) and kept for the next time."""
    entry, limit = None, limit_bytes() if use_cache else 0  # a bad limit fails before the export, not after
    if use_cache:
        large = tree_bytes(source.path) > LARGE_MODEL_BYTES  # a second per GiB or so to hash: said, not silent
        with step("hashing the model files for the export cache", timings, "export_key") if large else contextlib.nullcontext():
            entry = cache_dir() / EXPORTS / export_key(source, exporter, options)
    if entry is not None and (entry / MODEL_FILE).is_file():
        with step(f"reusing the {exporter.name} export kept for these model files", timings, "export_reused"):
            mark_used(entry)
            return load_onnx(entry / MODEL_FILE)
    with step(f"exporting to ONNX with {exporter.describe(options)}", timings, "export"):
        model = exporter.export(source, options, export_dir, eager_fp32_model)
    if entry is not None:
        started = time.perf_counter()
        model, why_not = _keep(model, export_dir, entry, limit)
        if why_not is None:
            console.print(f"[green]✓[/green] kept the export for the next convert of this model in {entry} [dim]({time.perf_counter() - started:.1f} s)[/dim]", soft_wrap=True)
        else:
            console.print(f"[yellow]![/yellow] the export is not kept for the next convert: {why_not}", soft_wrap=True)
    return model


def _keep(model: ir.Model, export_dir: Path, entry: Path, limit: int) -> tuple[ir.Model, str | None]:
    """Keep the export as ``entry``: the exporter's directory is moved there (the builder's
    SmolLM2 export takes 7.1 s, and writing its 540 MB again took 5.6 s; copied only from
    another file system), the graph saved as the exporter returned it, and the model read
    back from the entry. Returns the model to use and None, or the exporter's model and why
    it was not kept."""
    partial = entry.parent / f".{entry.name}.{os.getpid()}"
    external = {Path(v.const_value.base_dir).resolve() for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    if external - {export_dir.resolve()}:
        return model, "its weights are not in the exporter's directory"
    moved = False
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        size = tree_bytes(export_dir)
        if size > limit:
            return model, f"{size / 2**30:.1f} GiB is over SA_EXPORT_CACHE_EXPORTS_GB ({limit / 2**30:.1f} GiB)"
        evict_least_recent(entry.parent, limit - size)
        try:
            export_dir.rename(partial)
            moved = True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copytree(export_dir, partial)
        ir.save(model, partial / MODEL_FILE)  # external weights are referenced by file name and offset, not read
    except BaseException as exc:
        if moved:
            partial.rename(export_dir)  # back where the model reads its weights
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            return model, _reason(exc, entry.parent)
        raise
    if entry.is_dir() and not (entry / MODEL_FILE).is_file():
        shutil.rmtree(entry, ignore_errors=True)  # an entry broken by hand: replaced
    try:
        partial.rename(entry)
    except OSError:
        if not (entry / MODEL_FILE).is_file():
            return load_onnx(partial / MODEL_FILE), f"{entry} is in the way"
        shutil.rmtree(partial, ignore_errors=True)  # another process kept the same key first: the same graph
    return load_onnx(entry / MODEL_FILE), None


def _reason(exc: OSError, where: Path) -> str:
    return f"{exc.strerror or exc} ({exc.filename or where})"


def evict_least_recent(root: Path, room: int) -> None:
    """Remove the least recently used entries until the others fit in ``room`` bytes.
    An entry used in the last ten minutes stays (another process may be reading it)."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    sizes = {p: tree_bytes(p) for p in entries}
    total = sum(sizes.values())
    for path in entries:
        if total <= room:
            break
        if time.time() - path.stat().st_mtime < 600:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= sizes[path]

"""sa_manifest.json: the contract between the converter and every runtime.

This module must not import torch or transformers: on-device runtimes read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from sa_export.atomic import current_umask
from sa_export.errors import UsageError

MANIFEST_NAME = "sa_manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Which cache tensors one layer has, with their graph input and output names."""

    layer: int
    key_input: str | None
    key_output: str | None
    value_input: str | None
    value_output: str | None

    @property
    def has_key(self) -> bool:
        return self.key_input is not None

    @property
    def has_value(self) -> bool:
        return self.value_input is not None

    def pairs(self) -> list[tuple[str, str]]:
        """(past input, present output) pairs this layer feeds back between steps."""
        pairs = []
        if self.key_input and self.key_output:
            pairs.append((self.key_input, self.key_output))
        if self.value_input and self.value_output:
            pairs.append((self.value_input, self.value_output))
        return pairs

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "k_cache": self.has_key,
            "v_cache": self.has_value,
            "key_input": self.key_input,
            "key_output": self.key_output,
            "value_input": self.value_input,
            "value_output": self.value_output,
        }

    @classmethod
    def from_json(cls, data: dict) -> LayerCache:
        return cls(data["layer"], data["key_input"], data["key_output"], data["value_input"], data["value_output"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_hashes(out_dir: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(out_dir / name) for name in sorted(names)}


def write_json_atomic(path: Path, data) -> None:
    """Write JSON next to its destination, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not Path(out_dir).is_dir():
        raise UsageError(f"{out_dir} is not a directory; give the OUT directory that `sa-export convert` wrote")
    if not path.is_file():
        raise UsageError(f"{out_dir} has no {MANIFEST_NAME}; give the OUT directory that `sa-export convert` wrote")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); re-run `sa-export convert`") from None
    if data.get("format") != FORMAT_VERSION:
        raise UsageError(f"{path} has format {data.get('format')!r}; this sa-export reads format {FORMAT_VERSION}")
    return data


def cache_layout(manifest: dict) -> list[LayerCache]:
    return [LayerCache.from_json(entry) for entry in manifest["cache"]["layers"]]


def verify_artifacts(out_dir: Path, manifest: dict) -> None:
    """Refuse artifacts that changed since the manifest was written."""
    for name, expected in manifest["files"].items():
        path = Path(out_dir) / name
        if not path.is_file():
            raise UsageError(f"{path} listed in the manifest is missing; re-run `sa-export convert`")
        if sha256_file(path) != expected:
            raise UsageError(f"{path} does not match the sha256 in its manifest (changed after convert?); re-run `sa-export convert`")

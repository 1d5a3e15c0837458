"""sa_manifest.json: the contract between the converter and every runtime.

One typed, versioned dataclass with one reader (`Manifest.read`, which validates) and
one writer (`Manifest.write`, atomic). This module must not import torch, transformers
or onnx: on-device runtimes read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from sa_export.core.atomic import write_json_atomic
from sa_export.core.cache_names import itemsize
from sa_export.core.errors import UsageError
from sa_export.core.plan import SharingPlan

MANIFEST_NAME = "sa_manifest.json"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"


class ManifestError(UsageError):
    """A manifest that is missing, unreadable, of another format or missing a field."""


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Which cache tensors one layer has, with their graph input and output names."""

    layer: int
    key_input: str | None
    key_output: str | None
    value_input: str | None
    value_output: str | None
    key_heads: int | None = None  # a partly shared layer's K cache: the KV groups it keeps; None: all
    # The GroupQueryAttention graph splits a partly shared layer's V cache: ``value`` holds
    # the kept groups' (``value_heads``), which its own GQA reads with the K cache, and
    # ``borrowed_value`` the borrowed groups', which the borrowed probabilities read.
    value_heads: int | None = None
    borrowed_value_input: str | None = None
    borrowed_value_output: str | None = None

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
        if self.borrowed_value_input and self.borrowed_value_output:
            pairs.append((self.borrowed_value_input, self.borrowed_value_output))
        return pairs

    def to_json(self) -> dict:
        data = {
            "layer": self.layer,
            "k_cache": self.has_key,
            "v_cache": self.has_value,
            "key_input": self.key_input,
            "key_output": self.key_output,
            "value_input": self.value_input,
            "value_output": self.value_output,
        }
        if self.key_heads is not None:
            data["key_heads"] = self.key_heads
        if self.borrowed_value_input is not None:  # written only when split, so other manifests read as before
            data.update(value_heads=self.value_heads, borrowed_value_input=self.borrowed_value_input, borrowed_value_output=self.borrowed_value_output)
        return data

    @classmethod
    def from_json(cls, data: dict) -> LayerCache:
        return cls(
            data["layer"], data["key_input"], data["key_output"], data["value_input"], data["value_output"], data.get("key_heads"),
            data.get("value_heads"), data.get("borrowed_value_input"), data.get("borrowed_value_output"),
        )


@dataclasses.dataclass(frozen=True)
class KVSavings:
    bytes_per_token_base: int
    bytes_per_token_sa: int
    bytes_per_token_saved: int
    fraction_saved: float

    @classmethod
    def of(cls, layers: list[LayerCache], num_kv_heads: int, head_dim: int, dtype: str) -> KVSavings:
        per_head = head_dim * itemsize(dtype)
        base = 2 * len(layers) * num_kv_heads * per_head
        key_heads = [layer.key_heads if layer.key_heads is not None else num_kv_heads for layer in layers]
        # A split V cache (value and borrowed_value) holds every group's V between its two tensors.
        sa = sum(per_head * (heads * layer.has_key + num_kv_heads * layer.has_value) for layer, heads in zip(layers, key_heads))
        return cls(base, sa, base - sa, round((base - sa) / base, 6) if base else 0.0)


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """The cache layout: per layer which tensors exist, and how presents relate to pasts."""

    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | float16
    layout: str
    buffer: str  # "concat": a longer copy each step; "shared": present bound to its past's buffer, written in place
    savings: KVSavings
    layers: tuple[LayerCache, ...]
    max_length: int | None = None  # capacity of a shared buffer

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    def key_share(self, layer: LayerCache) -> float:
        """How much of its K cache (and of the Q K^T a step computes) a layer keeps: 1, none, or
        for a partly shared layer the share of its KV groups it keeps."""
        if not layer.has_key:
            return 0.0
        return 1.0 if layer.key_heads is None else layer.key_heads / self.num_kv_heads

    def kv_heads_of(self, past: str) -> int:
        """KV heads of one cache input: a partly shared layer's K cache holds only the groups it
        keeps, and where its V cache is split (GroupQueryAttention), each part its groups."""
        for layer in self.layers:
            if past == layer.key_input and layer.key_heads is not None:
                return layer.key_heads
            if past == layer.value_input and layer.value_heads is not None:
                return layer.value_heads
            if past == layer.borrowed_value_input:
                return self.num_kv_heads - (layer.value_heads or 0)
        return self.num_kv_heads

    def to_json(self) -> dict:
        data = {
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "dtype": self.dtype, "layout": self.layout,
            "buffer": self.buffer, "savings": dataclasses.asdict(self.savings), "layers": [l.to_json() for l in self.layers],
        }
        if self.buffer == "shared":
            data["max_length"] = self.max_length
        return data

    @classmethod
    def from_json(cls, data: dict) -> CacheInfo:
        return cls(
            data["num_kv_heads"], data["head_dim"], data["dtype"], data["layout"], data.get("buffer", "concat"),
            KVSavings(**data["savings"]), tuple(LayerCache.from_json(l) for l in data["layers"]), data.get("max_length"),
        )


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    model: str  # what the user typed: alias or path
    kind: str  # hf | onnx
    path: str
    reference: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    saved_by_transformers: str | None = None
    accepted_unknown_config_keys: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "accepted_unknown_config_keys": list(self.accepted_unknown_config_keys)}

    @classmethod
    def from_json(cls, data: dict) -> SourceInfo:
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**{**data, "accepted_unknown_config_keys": tuple(data.get("accepted_unknown_config_keys") or ())})


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    num_heads: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to run an OUT directory, and what produced it."""

    tool: dict[str, Any]
    source: SourceInfo
    num_layers: int
    model: ModelFacts | None
    plan: SharingPlan
    cache: CacheInfo
    io: dict[str, str]
    precision: str
    target: str
    exporter: str | None
    opset: int | None
    eos_token_ids: tuple[int, ...]
    files: dict[str, str]
    model_file: str = MODEL_FILE
    parity: dict | None = None
    head_map: dict | None = None
    target_build: dict | None = None
    format: int = FORMAT_VERSION

    @property
    def layout(self) -> tuple[LayerCache, ...]:
        return self.cache.layers

    @property
    def has_position_ids(self) -> bool:
        return "position_ids" in self.io

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)

    def with_files(self, out_dir: Path, names: list[str]) -> Manifest:
        return self.replace(files={**self.files, **artifact_hashes(out_dir, names)})

    def to_json(self) -> dict:
        data = {
            "format": self.format,
            "tool": self.tool,
            "source": self.source.to_json(),
            "num_layers": self.num_layers,
            "model": dataclasses.asdict(self.model) if self.model else None,
            "plan": self.plan.to_json(),
            "cache": self.cache.to_json(),
            "model_file": self.model_file,
            "io": self.io,
            "precision": self.precision,
            "target": self.target,
            "exporter": self.exporter,
            "opset": self.opset,
            "eos_token_ids": list(self.eos_token_ids),
            "files": self.files,
            "parity": self.parity,
            "head_map": self.head_map,
        }
        if self.target_build is not None:
            data["target_build"] = self.target_build
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{where} has format {found!r}; this sa-export reads format {FORMAT_VERSION}")
        try:
            return cls(
                tool=data["tool"],
                source=SourceInfo.from_json(data["source"]),
                num_layers=int(data["num_layers"]),
                model=ModelFacts(**data["model"]) if data.get("model") else None,
                plan=SharingPlan.from_json(data["plan"]),
                cache=CacheInfo.from_json(data["cache"]),
                io=dict(data["io"]),
                precision=data["precision"],
                target=data["target"],
                exporter=data.get("exporter"),
                opset=data.get("opset"),
                eos_token_ids=tuple(int(e) for e in data.get("eos_token_ids") or ()),
                files=dict(data["files"]),
                model_file=data.get("model_file", MODEL_FILE),
                parity=data.get("parity"),
                head_map=data.get("head_map"),
                target_build=data.get("target_build"),
            )
        except KeyError as exc:
            raise ManifestError(f"{where} lacks the field {exc.args[0]!r}; re-run `sa-export convert`") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where} has a malformed field ({exc}); re-run `sa-export convert`") from None

    @classmethod
    def read(cls, out_dir: Path) -> Manifest:
        """The one reader: validates the directory, the JSON, the format and every field."""
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST_NAME
        if not out_dir.is_dir():
            raise ManifestError(f"{out_dir} is not a directory; give the OUT directory that `sa-export convert` wrote")
        if not path.is_file():
            raise ManifestError(f"{out_dir} has no {MANIFEST_NAME}; give the OUT directory that `sa-export convert` wrote")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); re-run `sa-export convert`") from None
        return cls.from_json(data, str(path))

    def write(self, out_dir: Path) -> None:
        """The one writer: atomic, next to the artifacts it describes."""
        write_json_atomic(Path(out_dir) / MANIFEST_NAME, self.to_json())

    def require_artifacts(self, out_dir: Path) -> None:
        """Refuse an OUT that lacks a file its manifest lists, names a file outside itself, or
        runs a graph that no hash covers (cheap: no hashing). A manifest is data from disk: a
        path in it that leaves OUT would make `check` pass a graph, or hash a file, elsewhere."""
        if self.model_file not in self.files:
            raise ManifestError(f"{Path(out_dir) / MANIFEST_NAME} lists no sha256 for its graph {self.model_file}; re-run `sa-export convert`")
        root = Path(out_dir).resolve()
        for name in self.files:
            path = Path(out_dir) / name
            if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
                raise ManifestError(f"{name!r} in {Path(out_dir) / MANIFEST_NAME} is outside {out_dir}; re-run `sa-export convert`")
            if not path.is_file():
                raise ManifestError(f"{path} listed in the manifest is missing; re-run `sa-export convert`")

    def verify_artifacts(self, out_dir: Path) -> None:
        """Refuse artifacts that are missing or changed since the manifest was written."""
        self.require_artifacts(out_dir)
        for name, expected in self.files.items():
            path = Path(out_dir) / name
            if sha256_file(path) != expected:
                raise ManifestError(f"{path} does not match the sha256 in its manifest (changed after convert?); re-run `sa-export convert`")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_hashes(out_dir: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(out_dir / name) for name in sorted(names)}

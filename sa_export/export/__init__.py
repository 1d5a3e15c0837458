"""Exporters as a registry of objects: each declares its graph family, precisions and
targets, and how it runs. Nothing outside this package tests an exporter's name.

optimum-onnx's TorchScript exporter was the default until transformers 5: its newest
release (0.1.0) requires transformers<4.58, so it cannot run beside the transformers
that saves today's checkpoints (README "Exporters").
"""

from __future__ import annotations

from sa_export.core.choices import AUTO, DEFAULT_EXPORTER, REMOVED_EXPORTERS
from sa_export.core.errors import UsageError
from sa_export.export.base import DECOMPOSED, GROUP_QUERY_ATTENTION, Exporter, ExportOptions
from sa_export.export.dynamo import DynamoExporter
from sa_export.export.genai import GenaiExporter, builder_installed, has_tokenizer_files

EXPORTERS: dict[str, Exporter] = {exporter.name: exporter for exporter in (DynamoExporter(), GenaiExporter())}


def get_exporter(name: str) -> Exporter:
    if name in REMOVED_EXPORTERS:
        raise UsageError(f"--exporter {name} was removed: {REMOVED_EXPORTERS[name]}")
    if name not in EXPORTERS:
        raise UsageError(f"unknown exporter {name!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def choose_exporter(config, target, source, precision: str) -> tuple[Exporter, str]:
    """For --exporter auto: the fastest graph the target and the model allow, and why.

    ONNX Runtime targets get the builder's GroupQueryAttention graph where the builder and
    the GQA rewrite both serve the model; everything else the decomposed dynamo graph.
    """
    fast, default = EXPORTERS["genai"], EXPORTERS[DEFAULT_EXPORTER]
    reason = _why_not_fast(fast, config, target, source, precision)
    if reason is None:
        return fast, "the fastest graph ONNX Runtime runs (GroupQueryAttention, cache written in place)"
    if precision not in default.precisions:
        raise UsageError(f"--precision {precision} is onnxruntime-genai's builder graph, which cannot serve here: {reason}")
    return default, reason


def _why_not_fast(fast: Exporter, config, target, source, precision: str) -> str | None:
    """Why the builder's graph cannot serve this conversion; None when it can."""
    if target.uses_tensorrt:
        return f"TensorRT targets take the decomposed graph ({target.name})"
    try:
        fast.refuse(config, target, source.kind)
    except UsageError as exc:
        return str(exc).removeprefix("--exporter genai: ")
    if config is None or config.model_type not in fast.rewritable:
        kind = config.model_type if config is not None else "this model"
        return f"the GroupQueryAttention rewrite handles the builder's packed QKV of {', '.join(fast.rewritable)}, not {kind}"
    if precision not in fast.precisions:
        return f"the builder's CPU graph is {'/'.join(fast.precisions)}; --precision {precision} takes the decomposed graph"
    if not has_tokenizer_files(source.path):
        return "the builder needs the model's tokenizer files, and the model has none"
    if not builder_installed():
        return "onnxruntime-genai is not installed"
    return None


def exporter_of_manifest(name: str | None) -> Exporter:
    """The exporter that made a manifest's graph family; a removed one maps to the default,
    which makes the same family (manifests before the exporter was recorded were optimum's)."""
    name = name or "optimum"
    return EXPORTERS[DEFAULT_EXPORTER] if name in REMOVED_EXPORTERS else get_exporter(name)


__all__ = [
    "AUTO", "DECOMPOSED", "DEFAULT_EXPORTER", "EXPORTERS", "GROUP_QUERY_ATTENTION", "REMOVED_EXPORTERS",
    "ExportOptions", "Exporter", "choose_exporter", "exporter_of_manifest", "get_exporter",
]

"""Exporters as a registry of objects: each declares its graph family, precisions and
targets, and how it runs. Nothing outside this package tests an exporter's name.

optimum-onnx's TorchScript exporter was the default until transformers 5: its newest
release (0.1.0) requires transformers<4.58, so it cannot run beside the transformers
that saves today's checkpoints (README "Exporters").
"""

from __future__ import annotations

from sa_export.core.errors import UsageError
from sa_export.export.base import DECOMPOSED, GROUP_QUERY_ATTENTION, Exporter, ExportOptions
from sa_export.export.dynamo import DynamoExporter
from sa_export.export.genai import GenaiExporter

EXPORTERS: dict[str, Exporter] = {exporter.name: exporter for exporter in (DynamoExporter(), GenaiExporter())}
DEFAULT_EXPORTER = "dynamo"
REMOVED_EXPORTERS = {
    "optimum": "optimum-onnx (newest release 0.1.0) requires transformers<4.58 and cannot read checkpoints saved by "
    "transformers 5; use the default --exporter dynamo (the same decomposed graph family)",
}


def get_exporter(name: str) -> Exporter:
    if name in REMOVED_EXPORTERS:
        raise UsageError(f"--exporter {name} was removed: {REMOVED_EXPORTERS[name]}")
    if name not in EXPORTERS:
        raise UsageError(f"unknown exporter {name!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def exporter_of_manifest(name: str | None) -> Exporter:
    """The exporter that made a manifest's graph family; a removed one maps to the default,
    which makes the same family (manifests before the exporter was recorded were optimum's)."""
    name = name or "optimum"
    return EXPORTERS[DEFAULT_EXPORTER] if name in REMOVED_EXPORTERS else get_exporter(name)


__all__ = [
    "DECOMPOSED", "DEFAULT_EXPORTER", "EXPORTERS", "GROUP_QUERY_ATTENTION", "REMOVED_EXPORTERS",
    "ExportOptions", "Exporter", "exporter_of_manifest", "get_exporter",
]

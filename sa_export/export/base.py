"""What an exporter declares and the one call every exporter answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from graph_passes.sequences import DECOMPOSED, GROUP_QUERY_ATTENTION  # noqa: F401  (the families exporters declare)
from sa_export.core.errors import UsageError
from sa_export.hf.models import ModelSource


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Everything an exporter needs besides the model: precision, opset and what loading may do."""

    precision: str = "fp32"
    opset: int | None = None  # None: the exporter's default
    allow_pickle: bool = False
    accept_unknown_config_keys: bool = False


class Exporter:
    """An exporter of Hugging Face decoder LMs to ONNX with past key values.

    Subclasses declare what they produce; callers ask these instead of testing names.
    """

    name: ClassVar[str]
    graph_family: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    serves_tensorrt: ClassVar[bool]  # its graphs are what TensorRT targets take
    has_position_ids: ClassVar[bool]
    # model_type -> why this exporter cannot build it under the pinned packages.
    unsupported: ClassVar[dict[str, str]] = {}

    def default_opset(self) -> int | None:
        return None

    def resolve_opset(self, opset: int | None) -> int | None:
        if opset is not None and opset != self.default_opset():
            raise UsageError(f"--opset applies to --exporter dynamo; {self.name} chooses its own")
        return self.default_opset()

    def describe(self, options: ExportOptions) -> str:
        raise NotImplementedError

    def refuse(self, config, target, source_kind: str) -> None:
        """Raise UsageError when this exporter cannot serve the model, target or input kind."""
        if config is not None and config.model_type in self.unsupported:
            raise UsageError(f"--exporter {self.name}: {self.unsupported[config.model_type]}")

    def export(self, source: ModelSource, options: ExportOptions, export_dir: Path, eager_fp32_model=None) -> ir.Model:
        """The unshared ONNX model of ``source``; ``eager_fp32_model`` is reused where it is what the export needs."""
        raise NotImplementedError

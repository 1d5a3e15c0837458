"""Will the target's TensorRT parse this graph? Checked before anything is built.

The data follows onnx-tensorrt's operator support matrix (docs/operators.md) and the
TensorRT release notes: the parser imports opsets 9-20 up to TensorRT 10.12, 9-24
from 10.13 and 9-25 from 11.5; Attention from 10.14 (4-D Q/K/V, no past inputs);
RotaryEmbedding, RMSNormalization and TensorScatter (4-D cache and update, axis -2)
from 10.15. Only the default ONNX domain.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from sa_export.core.errors import UsageError
from targets.profiles import TargetProfile
from targets.shapes import Profile

# (first TensorRT version, highest ONNX opset its parser imports), newest last.
MAX_OPSET = (((10, 0), 20), ((10, 13), 24), ((11, 5), 25))
# ONNX ops the parser imports only from a given TensorRT version.
OPS_SINCE = {
    "Attention": (10, 14),
    "RMSNormalization": (10, 15),
    "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15),
}
# Standard ONNX ops the TensorRT ONNX parser does not implement.
UNSUPPORTED_OPS = frozenset(
    {
        "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
        "BlackmanWindow", "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "DFT", "Det",
        "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger",
        "MelWeightMatrix", "Multinomial", "Optional", "OptionalGetElement", "OptionalHasElement",
        "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct",
        "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence",
        "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
    }
)
UNSUPPORTED_DTYPES = {ir.DataType.STRING, ir.DataType.COMPLEX64, ir.DataType.COMPLEX128, ir.DataType.DOUBLE}


@dataclasses.dataclass(frozen=True)
class CompatibilityReport:
    target: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def max_opset(version: tuple[int, int]) -> int:
    return max(opset for since, opset in MAX_OPSET if version >= since)


def parses(op_type: str, version: tuple[int, int]) -> bool:
    """Whether TensorRT ``version``'s ONNX parser imports the standard op ``op_type``."""
    return op_type not in UNSUPPORTED_OPS and version >= OPS_SINCE.get(op_type, (0, 0))


def check_compatibility(model: ir.Model, target: TargetProfile, profiles: list[Profile]) -> CompatibilityReport:
    problems: list[str] = []
    version = target.tensorrt_version
    low, high = 9, max_opset(version)
    opset = model.opset_imports.get("", None)
    if opset is None or not low <= opset <= high:
        problems.append(f"opset {opset} is outside TensorRT {target.tensorrt}'s range {low}-{high}")
    for node in model.graph.all_nodes():
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is runtime-specific (re-export without ORT fusions)")
        elif node.op_type in UNSUPPORTED_OPS:
            problems.append(f"{where}: TensorRT's ONNX parser does not support {node.op_type}")
        elif not parses(node.op_type, version):
            since = ".".join(map(str, OPS_SINCE[node.op_type]))
            problems.append(f"{where}: TensorRT {target.tensorrt}'s ONNX parser does not import {node.op_type} (from {since})")
        for value in node.outputs:
            if value.dtype in UNSUPPORTED_DTYPES:
                problems.append(f"{where}: output {value.name!r} has dtype {value.dtype.name}, which TensorRT does not take")
    covered = set().union(*(p.shapes.keys() for p in profiles))
    for value in model.graph.inputs:
        dynamic = [d for d in (value.shape or []) if not isinstance(d, int)]
        if dynamic and value.name not in covered:
            problems.append(f"input {value.name!r} has dynamic dims {[str(d) for d in dynamic]} that no optimization profile covers")
        for profile in profiles:
            shape = profile.shapes.get(value.name)
            if shape is None or value.shape is None:
                continue
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, int) and not shape.min[axis] == shape.max[axis] == dim:
                    problems.append(f"input {value.name!r}: profile {profile.name} sets axis {axis} to {shape.min[axis]}-{shape.max[axis]}, the graph fixes it at {dim}")
    for name in covered - {v.name for v in model.graph.inputs}:
        problems.append(f"profile names input {name!r}, which the graph does not have")
    return CompatibilityReport(target.name, tuple(problems))


def raise_if_incompatible(report: CompatibilityReport) -> None:
    if not report.ok:
        shown = "; ".join(report.problems[:8])
        more = f" (and {len(report.problems) - 8} more)" if len(report.problems) > 8 else ""
        raise UsageError(f"the graph does not fit TensorRT on {report.target}: {shown}{more}")


_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_input_names(names: list[str]) -> None:
    """trtexec shape flags are name:dims lists separated by commas: names must not contain those."""
    bad = [n for n in names if not _SAFE.match(n)]
    if bad:
        raise UsageError(f"input names {bad} cannot be passed to trtexec shape flags")

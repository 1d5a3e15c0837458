"""Apply a sharing plan to an ONNX model: its family's pass sequence, recorded in the model."""

from __future__ import annotations

import dataclasses
import json
import math

import onnx_ir as ir

from graph_passes.attention_blocks import cache_layers
from graph_passes.sequences import graph_family, run_sequence, sharing_sequence
from sa_export.core.errors import PlanError
from sa_export.core.plan import SharingPlan

PLAN_METADATA_KEY = "sa_export.plan"


@dataclasses.dataclass(frozen=True)
class RewriteReport:
    modified: bool
    layers_found: int
    nodes_before: int
    nodes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    removed_nodes: tuple[str, ...]

    @property
    def weight_bytes_removed(self) -> int:
        return self.weight_bytes_before - self.weight_bytes_after


def initializer_bytes(graph: ir.Graph) -> int:
    """Bytes of all initializers, from shapes and dtypes (external data is not read)."""
    total = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        total += math.prod(tensor.shape.numpy()) * tensor.dtype.itemsize
    return int(total)


def recorded_plan(model: ir.Model) -> SharingPlan | None:
    text = model.metadata_props.get(PLAN_METADATA_KEY)
    return SharingPlan.from_json(json.loads(text)) if text else None


def apply_sharing_plan(model: ir.Model, plan: SharingPlan, precision: str = "fp32", in_place_cache: bool = False) -> RewriteReport:
    """Rewrite ``model`` in place so that the plan's shared layers reuse their anchors' probabilities.

    An empty plan runs the same sequence (the bench baseline: unfused, fp32 scores), sharing nothing.
    ``in_place_cache``: caches become fixed-capacity buffers written by TensorScatter (TensorRT >= 10.15).
    """
    graph = model.graph
    nodes_before = list(graph)
    bytes_before = initializer_bytes(graph)
    previous = recorded_plan(model)
    if previous is not None:
        if previous.to_json() == plan.to_json():
            return RewriteReport(False, len(cache_layers(graph)), len(nodes_before), len(nodes_before), bytes_before, bytes_before, ())
        raise PlanError(
            f"this graph was already converted with another plan ({previous.describe()}); convert the original export instead"
        )
    result = run_sequence(sharing_sequence(graph_family(graph), plan, precision, in_place_cache), model)
    remaining = set(map(id, graph))
    if plan.anchors:
        model.metadata_props[PLAN_METADATA_KEY] = json.dumps(plan.to_json(), sort_keys=True)
    return RewriteReport(
        modified=result.modified,
        layers_found=len(cache_layers(graph)),
        nodes_before=len(nodes_before),
        nodes_after=len(remaining),
        weight_bytes_before=bytes_before,
        weight_bytes_after=initializer_bytes(graph),
        removed_nodes=tuple(n.name or n.op_type for n in nodes_before if id(n) not in remaining),
    )

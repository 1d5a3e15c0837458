"""Apply a sharing plan to an ONNX model: the pass sequence plus its postconditions."""

from __future__ import annotations

import dataclasses
import json
import math

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from graph_passes.attention_blocks import cache_layers, find_attention_blocks, refuse_fused_attention
from graph_passes.drop_k_cache import DropKCachePass
from graph_passes.narrow_projections import (
    NarrowInterleavedProjectionsPass,
    NarrowSlicedProjectionsPass,
    NarrowSplitProjectionsPass,
    ShapeFromLiveSplitOutputPass,
)
from graph_passes.share_gqa import is_gqa_graph, share_gqa_layers
from graph_passes.share_probabilities import ShareProbabilitiesPass
from graph_passes.unfuse_attention import UnfuseAttentionPass
from sa_export.errors import AttentionPatternError, PlanError
from sa_export.plan import SharingPlan

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


def apply_sharing_plan(model: ir.Model, plan: SharingPlan) -> RewriteReport:
    """Rewrite ``model`` in place so that the plan's shared layers reuse their anchors' probabilities."""
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

    if is_gqa_graph(graph):
        share_gqa_layers(model, plan)
        RemoveUnusedNodesPass()(model)
        return _recorded(model, plan, nodes_before, bytes_before, len(cache_layers(graph)))
    refuse_fused_attention(graph)
    UnfuseAttentionPass()(model)
    layers = cache_layers(graph)
    if not layers:
        raise PlanError("the ONNX graph has no past_key_values inputs; export it with past key values (task text-generation-with-past)")
    if len(layers) != plan.num_layers:
        raise PlanError(f"the plan is for {plan.num_layers} layers but the graph has a cache for {len(layers)}")
    blocks = find_attention_blocks(graph)
    if [b.layer for b in blocks] != sorted(layers):
        missing = sorted(set(layers) - {b.layer for b in blocks})
        raise AttentionPatternError(missing[0] if missing else None, "no decomposed attention (MatMul/Softmax/MatMul) found for this layer")
    shared_blocks = [b for b in blocks if plan.is_shared(b.layer)]

    ShareProbabilitiesPass(plan)(model)
    DropKCachePass(plan)(model)
    RemoveUnusedNodesPass()(model)
    ShapeFromLiveSplitOutputPass()(model)
    NarrowSlicedProjectionsPass()(model)
    NarrowSplitProjectionsPass()(model)
    NarrowInterleavedProjectionsPass()(model)
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)

    remaining = set(map(id, graph))
    for block in shared_blocks:
        for node in (block.scores_matmul, block.softmax):
            if id(node) in remaining:
                raise AttentionPatternError(block.layer, f"{node.op_type} {node.name!r} is still live after sharing")
    return _recorded(model, plan, nodes_before, bytes_before, len(blocks))


def _recorded(model: ir.Model, plan: SharingPlan, nodes_before: list[ir.Node], bytes_before: int, layers_found: int) -> RewriteReport:
    """Record the plan in the model and report what the rewrite removed."""
    graph = model.graph
    remaining = set(map(id, graph))
    model.metadata_props[PLAN_METADATA_KEY] = json.dumps(plan.to_json(), sort_keys=True)
    removed = tuple(n.name or n.op_type for n in nodes_before if id(n) not in remaining)
    return RewriteReport(
        modified=True,
        layers_found=layers_found,
        nodes_before=len(nodes_before),
        nodes_after=len(remaining),
        weight_bytes_before=bytes_before,
        weight_bytes_after=initializer_bytes(graph),
        removed_nodes=removed,
    )

"""Conditions every pass sequence checks before and after it runs."""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.attention_blocks import cache_layers
from sa_export.core.errors import AttentionPatternError, PlanError


def io_types(model: ir.Model) -> dict[str, tuple]:
    """Name -> (dtype, shape) of every graph input and output."""
    graph = model.graph
    return {v.name: (v.dtype, tuple(v.shape) if v.shape is not None else None) for v in [*graph.inputs, *graph.outputs]}


def require_cache_for(model: ir.Model, num_layers: int) -> None:
    layers = cache_layers(model.graph)
    if not layers:
        raise PlanError("the ONNX graph has no past_key_values inputs; export it with past key values (task text-generation-with-past)")
    if len(layers) != num_layers:
        raise PlanError(f"the plan is for {num_layers} layers but the graph has a cache for {len(layers)}")


def ensure_full_io_types(model: ir.Model, before: dict[str, tuple] | None = None) -> None:
    """Every graph input and output has a dtype and a shape of known rank, and those that
    existed before the sequence kept theirs (onnx.checker's full check needs both)."""
    for name, (dtype, shape) in io_types(model).items():
        if dtype is None or shape is None:
            raise AttentionPatternError(None, f"graph input/output {name!r} lost its {'type' if dtype is None else 'shape'} in the rewrite")
        if before is not None and name in before and before[name][0] != dtype:
            raise AttentionPatternError(None, f"graph input/output {name!r} changed type from {before[name][0]} to {dtype}")
        if before is not None and name in before and before[name][1] is not None and len(before[name][1]) != len(shape):
            raise AttentionPatternError(None, f"graph input/output {name!r} changed rank in the rewrite")

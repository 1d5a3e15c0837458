"""Remove the K cache of shared layers from the graph's inputs and outputs."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from sa_export.core.cache_names import past_name, present_name
from sa_export.core.errors import AttentionPatternError
from sa_export.core.plan import SharingPlan


class DropKCachePass(ir.passes.InPlacePass):
    """Drop ``present.N.key`` and ``past_key_values.N.key`` of every wholly shared layer.

    The present output goes first, then dead nodes, then the past input, which must
    have no consumer left: a remaining one means part of the K path is still live.
    """

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared = set(self.plan.whole_layers)  # a partly shared layer keeps part of it
        present = [v for v in graph.outputs if v.name in {present_name(n, "key") for n in shared}]
        for value in present:
            graph.outputs.remove(value)
        RemoveUnusedNodesPass()(model)
        past = [v for v in graph.inputs if v.name in {past_name(n, "key") for n in shared}]
        inputs = {v.name: v for v in graph.inputs}
        for value in past:
            _read_shape_from_value_cache(value, inputs.get(value.name.replace(".key", ".value")))
            if value.uses():
                user = next(iter(value.uses())).node
                raise AttentionPatternError(
                    int(value.name.split(".")[1]),
                    f"{value.name} is still read by {user.op_type} {user.name!r} after sharing; the K path is not dead",
                )
            graph.inputs.remove(value)
        return ir.passes.PassResult(model, bool(present or past))


def _read_shape_from_value_cache(key: ir.Value, value: ir.Value | None) -> None:
    """The dynamo export reads the batch and past length of the whole model from one layer's
    K cache (Shape); where that layer is shared, read them from its V cache, of the same shape."""
    if value is None or key.shape is None or key.shape != value.shape or key.dtype != value.dtype:
        return
    for use in list(key.uses()):
        if use.node.op_type == "Shape":
            use.node.replace_input_with(use.idx, value)

"""Make each shared layer consume its anchor's post-softmax probabilities."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.attention_blocks import AttentionBlock, find_attention_blocks
from sa_export.errors import AttentionPatternError
from sa_export.plan import SharingPlan


class ShareProbabilitiesPass(ir.passes.InPlacePass):
    """Rewire probs @ V of every shared layer to read the anchor's probabilities.

    A head map becomes one Gather on the head axis of the anchor's probabilities.
    The shared layer's own Q/K/softmax path is left dangling for dead-code removal.
    """

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = {block.layer: block for block in find_attention_blocks(model.graph)}
        modified = False
        for layer, anchor in sorted(self.plan.anchors.items()):
            if layer not in blocks:
                raise AttentionPatternError(layer, "no attention block found for this shared layer")
            if anchor not in blocks:
                raise AttentionPatternError(anchor, "anchor has no attention block (is it shared itself?)")
            source = self._anchor_probs(model.graph, blocks[anchor], layer)
            blocks[layer].context_matmul.replace_input_with(0, source)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _anchor_probs(self, graph: ir.Graph, anchor: AttentionBlock, layer: int) -> ir.Value:
        head_map = self.plan.head_map(layer)
        if head_map is None or list(head_map) == list(range(len(head_map))):
            return anchor.probs
        shape = anchor.probs.shape
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and len(head_map) != shape[1]:
            raise AttentionPatternError(layer, f"head map has {len(head_map)} entries but the anchor has {shape[1]} heads")
        indices = ir.Value(
            name=f"sa.layer{layer}.head_map",
            const_value=ir.tensor(np.asarray(head_map, dtype=np.int64), name=f"sa.layer{layer}.head_map"),
        )
        graph.register_initializer(indices)
        gather = ir.node("Gather", [anchor.probs, indices], attributes={"axis": 1}, name=f"sa.layer{layer}.head_map_gather")
        gather.outputs[0].name = f"sa.layer{layer}.probs"
        if anchor.probs.type is not None:
            gather.outputs[0].type = anchor.probs.type
        graph.insert_after(anchor.probs.producer(), gather)
        return gather.outputs[0]

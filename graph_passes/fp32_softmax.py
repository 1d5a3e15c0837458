"""Keep attention scores, the mask add and the Softmax in fp32 inside an fp16 graph.

An fp16 export computes Q K^T * scale + mask and the Softmax in fp16 (the Cast to
float32 that PyTorch's ``softmax(dtype=float32)`` asks for lands after the Softmax).
Scores overflow fp16 on real models, which TensorRT then turns into NaNs. This pass
casts the Q K^T output to fp32, casts every other input of the score arithmetic
(scale constants, the mask) to fp32, and so runs the Softmax in fp32; its output
then goes through the existing Cast back to fp16 before probs @ V.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.attention_blocks import SCORE_ARITHMETIC, find_attention_blocks
from sa_export.core.errors import AttentionPatternError


def _score_chain(scores: ir.Node, softmax: ir.Node) -> list[ir.Node]:
    """Arithmetic nodes on the paths from Q K^T down to the Softmax."""
    chain, frontier = [], [scores.outputs[0]]
    seen: set[int] = set()
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node = use.node
            if node is softmax or id(node) in seen or node.op_type not in SCORE_ARITHMETIC:
                continue
            seen.add(id(node))
            chain.append(node)
            frontier.extend(node.outputs)
    return chain


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, before: ir.Node, name: str) -> ir.Value:
    node = ir.node("Cast", [value], attributes={"to": to}, name=name)
    node.outputs[0].name = name + "_output"
    node.outputs[0].dtype = to
    graph.insert_before(before, node)
    return node.outputs[0]


class Fp32SoftmaxPass(ir.passes.InPlacePass):
    """Run every attention block's score arithmetic and Softmax in fp32 (idempotent)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for block in find_attention_blocks(graph):
            scores, softmax = block.scores_matmul, block.softmax
            uses = [u for u in scores.outputs[0].uses()]
            if len(uses) == 1 and uses[0].node.op_type == "Cast" and uses[0].node.attributes["to"].value == ir.DataType.FLOAT:
                continue  # already converted
            chain = _score_chain(scores, softmax)
            if not chain and softmax.inputs[0] is not scores.outputs[0]:
                raise AttentionPatternError(block.layer, "no arithmetic path from Q K^T to the Softmax")
            prefix = f"sa.fp32.layer{block.layer}"
            first = chain[0] if chain else softmax
            scores_fp32 = _cast(graph, scores.outputs[0], ir.DataType.FLOAT, first, f"{prefix}.scores")
            for use in list(scores.outputs[0].uses()):
                if use.node.name != f"{prefix}.scores":
                    use.node.replace_input_with(use.idx, scores_fp32)
            chain_outputs = {id(v) for node in chain for v in node.outputs} | {id(scores_fp32)}
            for index, node in enumerate(chain):
                if node.op_type == "Cast":
                    node.attributes["to"] = ir.Attr("to", ir.AttributeType.INT, ir.DataType.FLOAT)
                    continue
                for slot, value in enumerate(node.inputs):
                    if value is not None and id(value) not in chain_outputs:
                        node.replace_input_with(slot, _cast(graph, value, ir.DataType.FLOAT, node, f"{prefix}.in{index}_{slot}"))
            # Exports that annotate every value (dynamo) declare the chain fp16: it is fp32 now.
            for node in [*chain, softmax]:
                for output in node.outputs:
                    output.dtype = ir.DataType.FLOAT
            if block.probs is softmax.outputs[0]:
                # No cast between Softmax and probs @ V: V is fp16, so add one.
                probs16 = _cast(graph, softmax.outputs[0], ir.DataType.FLOAT16, block.context_matmul, f"{prefix}.probs")
                for use in list(softmax.outputs[0].uses()):
                    if use.node.op_type == "MatMul" and use.idx == 0:
                        use.node.replace_input_with(0, probs16)
            modified = True
        return ir.passes.PassResult(model, modified)

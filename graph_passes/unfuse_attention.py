"""Unfuse the standard ONNX Attention op (opset 23/24) into MatMul / Softmax / MatMul.

torch.onnx's dynamo exporter turns SDPA into ``Attention`` at opset 23. Sharing needs
the post-softmax probabilities as a tensor, so every Attention node becomes:

    Transpose(K) -> MatMul(Q, K^T) -> Mul(scale) [-> softcap] [-> mask] -> Softmax -> MatMul(., V)

A boolean mask selects between the scores and the most negative finite value of the
dtype (not -inf: fully padded rows then give a uniform row, not NaN, as in PyTorch's
eager attention). Nodes with cache inputs, a causal flag or used secondary outputs
are refused with the reason, as is grouped K/V (the exporters repeat K/V before SDPA).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.initializers import add_initializer

from sa_export.core.errors import AttentionPatternError



def _refusal(node: ir.Node) -> str | None:
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "has past key/value inputs (export with the cache concatenated before attention)"
    if node.attributes.get_int("is_causal", 0):
        return "uses is_causal=1; export with an explicit attention mask"
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return "has its present or qk outputs in use"
    q, k = node.inputs[0], node.inputs[1]
    if q.shape is None or len(q.shape) != 4:
        return "has Q of unknown or 3-D shape; only [batch, heads, seq, head_dim] is unfused"
    if k.shape is not None and len(k.shape) == 4 and isinstance(k.shape[1], int) and isinstance(q.shape[1], int) and k.shape[1] != q.shape[1]:
        return "groups K/V heads inside the op; export with K/V repeated to the query heads"
    return None


class UnfuseAttentionPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for index, node in enumerate([n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]):
            reason = _refusal(node)
            if reason is not None:
                raise AttentionPatternError(None, f"Attention node {node.name!r} {reason}")
            q, k, v = node.inputs[:3]
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            dtype = (q.dtype or ir.DataType.FLOAT).numpy()
            head_dim = q.shape[3]
            scale = node.attributes.get_float("scale", None)
            if scale is None:
                if not isinstance(head_dim, int):
                    raise AttentionPatternError(None, f"Attention node {node.name!r} has no scale and a symbolic head size")
                scale = head_dim**-0.5
            prefix = f"sa.unfused{index}"
            nodes = []

            def add(op_type, inputs, **attributes):
                new = ir.node(op_type, inputs, attributes=attributes or None, name=f"{prefix}.{op_type.lower()}{len(nodes)}")
                nodes.append(new)
                return new.outputs[0]

            k_t = add("Transpose", [k], perm=[0, 1, 3, 2])
            scores = add("Mul", [add("MatMul", [q, k_t]), add_initializer(graph, f"{prefix}.scale", np.array(scale, dtype))])
            softcap = node.attributes.get_float("softcap", 0.0)
            if softcap > 0:
                cap = add_initializer(graph, f"{prefix}.softcap", np.array(softcap, dtype))
                scores = add("Mul", [add("Tanh", [add("Div", [scores, cap])]), cap])
            if mask is not None:
                if mask.dtype == ir.DataType.BOOL:
                    lowest = add_initializer(graph, f"{prefix}.lowest", np.array(np.finfo(dtype).min, dtype))
                    scores = add("Where", [mask, scores, lowest])
                else:
                    scores = add("Add", [scores, mask])
            probs = add("Softmax", [scores], axis=-1)
            output = add("MatMul", [probs, v])
            graph.insert_before(node, nodes)
            ir.convenience.replace_all_uses_with(node.outputs[0], output, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)

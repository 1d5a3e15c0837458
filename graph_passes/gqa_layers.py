"""GroupQueryAttention layers of onnxruntime-genai's builder graph, and a builder for the nodes that replace them.

The builder gives Llama-style models (SmolLM2, Llama, Qwen2) per layer a packed QKV MatMul
(MatMulNBits in its int4 graph) feeding com.microsoft GroupQueryAttention, with rotary,
and past and present cache in one buffer (``past_present_share_buffer``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from graph_passes.initializers import add_initializer
from graph_passes.projections import MS_DOMAIN, is_projection, projection_width
from sa_export.core.errors import AttentionPatternError

GQA = "GroupQueryAttention"
QK_OUTPUT_SOFTMAX = 2  # GQA's qk_output mode for post-softmax probabilities
_CACHE_RE = re.compile(r"^(?:past_key_values|present)\.(\d+)\.(?:key|value)$")

# GQA inputs by position (com.microsoft schema).
QUERY, KEY, VALUE, PAST_KEY, PAST_VALUE, SEQLENS_K, TOTAL_LEN = range(7)


@dataclasses.dataclass
class GqaLayer:
    layer: int
    node: ir.Node
    qkv: ir.Node  # the packed projection MatMul
    bias: ir.Node | None  # its bias Add (Qwen2), if any
    num_heads: int
    kv_num_heads: int
    head_dim: int


def is_gqa_graph(graph: ir.Graph) -> bool:
    return any(node.op_type == GQA and node.domain == MS_DOMAIN for node in graph)


# The form onnxruntime-genai's builder gives Llama-style models (SmolLM2, Llama, Qwen2).
_UNSUPPORTED = "; the rewrite handles the builder's packed QKV projection (Llama, Qwen2): use the default exporter for this model"


def _layer_of(node: ir.Node) -> int | None:
    """The layer whose cache the node reads or writes (past_key_values.N.* / present.N.*)."""
    for value in [*node.inputs, *node.outputs]:
        match = _CACHE_RE.match(value.name or "") if value is not None else None
        if match:
            return int(match.group(1))
    return None


def find_gqa_layers(graph: ir.Graph) -> dict[int, GqaLayer]:
    """Every GroupQueryAttention node in the builder's form (packed QKV MatMul, cache in and out), by layer."""
    layers = {}
    for node in graph:
        if node.op_type != GQA or node.domain != MS_DOMAIN:
            continue
        layer = _layer_of(node)
        inputs = list(node.inputs) + [None] * 7
        if layer is None or len(node.outputs) < 3:
            raise AttentionPatternError(layer, f"{MS_DOMAIN} {GQA} {node.name!r} reads or writes no past_key_values.N / present.N cache{_UNSUPPORTED}")
        if inputs[KEY] is not None or inputs[VALUE] is not None:
            raise AttentionPatternError(layer, f"{MS_DOMAIN} {GQA} {node.name!r} takes separate Q, K and V; only packed QKV is handled{_UNSUPPORTED}")
        qkv = inputs[QUERY].producer() if inputs[QUERY] is not None else None
        bias = None
        if qkv is not None and qkv.op_type == "Add" and qkv.inputs[1].const_value is not None:
            bias, qkv = qkv, qkv.inputs[0].producer()
        if qkv is None or not is_projection(qkv):
            raise AttentionPatternError(layer, f"{MS_DOMAIN} {GQA} {node.name!r} is not fed by a packed QKV MatMul with constant weights{_UNSUPPORTED}")
        num_heads = node.attributes["num_heads"].as_int()
        kv_num_heads = node.attributes["kv_num_heads"].as_int()
        width = projection_width(qkv)
        layers[layer] = GqaLayer(layer, node, qkv, bias, num_heads, kv_num_heads, width // (num_heads + 2 * kv_num_heads))
    return layers


def take_place_of(old: ir.Value, new: ir.Value) -> None:
    """``new`` takes ``old``'s name, type, shape and uses, graph outputs included."""
    name = old.name
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def replace_gqa_node(graph: ir.Graph, layer: GqaLayer, new: ir.Node) -> None:
    """``new`` (already in the graph) takes the place of the layer's GQA node: its first
    outputs take the old outputs' names, types and uses (graph outputs included)."""
    old = layer.node
    for old_output, new_output in zip(old.outputs, new.outputs):
        take_place_of(old_output, new_output)
    graph.remove(old, safe=True)
    layer.node = new


class NodeBuilder:
    """Nodes named with a prefix: inserted before one node (the GQA being replaced), or, with
    ``before`` None, kept in ``nodes`` for a branch. Constants always go to the main graph,
    which a branch reads as its outer scope."""

    def __init__(self, graph: ir.Graph, before: ir.Node | None, prefix: str):
        self.graph, self.before, self.prefix = graph, before, prefix
        self.nodes: list[ir.Node] = []

    def const(self, name: str, array) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}.{name}", np.asarray(array))

    def node(self, op_type: str, inputs, name: str, domain: str = "", num_outputs: int = 1, **attributes) -> ir.Node:
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=num_outputs, name=f"{self.prefix}.{name}")
        for i, output in enumerate(node.outputs):
            output.name = node.name if i == 0 else f"{node.name}.{i}"  # a branch's values need names of their own
        if self.before is None:
            self.nodes.append(node)
        else:
            self.graph.insert_before(self.before, node)
        return node

    def op(self, op_type: str, inputs, name: str, domain: str = "", **attributes) -> ir.Value:
        return self.node(op_type, inputs, name, domain, **attributes).outputs[0]

    def heads(self, value: ir.Value, heads, total: int, head_dim: int, name: str) -> ir.Value:
        """Heads ``heads``, in that order, of ``value`` [B, S, total * head_dim]: a Slice of the
        columns when they are consecutive, else a Gather of whole heads (an index per head, not
        per column: a column index constant is head_dim times the size)."""
        heads = [int(h) for h in heads]
        if heads == list(range(heads[0], heads[0] + len(heads))):
            bounds = [self.const(f"{name}_{edge}", np.array([h * head_dim], np.int64)) for edge, h in (("start", heads[0]), ("end", heads[-1] + 1))]
            return self.op("Slice", [value, *bounds, self.const(f"{name}_axis", np.array([2], np.int64))], name)
        by_head = self.op("Reshape", [value, self.const(f"{name}_by_head_shape", np.array([0, 0, total, head_dim], np.int64))], f"{name}_by_head")
        picked = self.op("Gather", [by_head, self.const(f"{name}_heads", np.array(heads, np.int64))], f"{name}_picked", axis=2)
        return self.op("Reshape", [picked, self.const(f"{name}_shape", np.array([0, 0, len(heads) * head_dim], np.int64))], name)

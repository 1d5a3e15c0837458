"""Caches as fixed-capacity buffers written in place (TensorScatter), for TensorRT >= 10.15.

The decomposed graph concatenates each past with the new rows, so a decode step copies
the whole cache. Here each past is a buffer of the runtime's capacity:

* the new rows go in with ``TensorScatter(past, new, write_indices)`` on axis -2 at the
  past length, which the runtime passes as ``attention_mask``'s length minus the new
  tokens (TensorRT 10.15+ imports this as an in-place KV-cache update; ONNX Runtime
  writes in place when present and past are bound to one buffer);
* attention reads only the filled part, ``Slice(buffer, 0, total_length)`` on axis 2, so
  a step costs in proportion to the context, not the capacity;
* reads of a cache's shape (the export takes the past length from them) become the
  shape [batch, kv_heads, past_length, head_dim] computed from the inputs.

Layers whose K cache sharing removed keep only their V buffer; the anchors' MatMul/Softmax
stay as they are (TensorRT's fused attention cannot output probabilities).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.attention_blocks import cache_layers
from graph_passes.initializers import add_initializer
from sa_export.core.errors import AttentionPatternError

TENSOR_SCATTER_OPSET = 24
CAPACITY_DIM = "max_cache_length"


class _Shapes:
    """Batch, past length, total length and write indices, computed once from the inputs."""

    def __init__(self, graph: ir.Graph, before: ir.Node):
        self.graph, self.before = graph, before
        inputs = {v.name: v for v in graph.inputs}
        ids_shape = self._op("Shape", [inputs["input_ids"]], "ids_shape")
        mask_shape = self._op("Shape", [inputs["attention_mask"]], "mask_shape")
        self.batch = self._op("Slice", [ids_shape, self._const("zero", [0]), self._const("one", [1])], "batch")
        seq = self._op("Slice", [ids_shape, self._const("one", [1]), self._const("two", [2])], "sequence_length")
        self.total = self._op("Slice", [mask_shape, self._const("one", [1]), self._const("two", [2])], "total_length")
        self.past = self._op("Sub", [self.total, seq], "past_length")
        self.write_indices = self._op("Expand", [self.past, self.batch], "write_indices")  # [batch]: every row at the past length
        self._cache_shapes: dict[tuple[int, int], ir.Value] = {}

    def _const(self, name: str, values) -> ir.Value:
        full = f"sa.cache.{name}"
        existing = self.graph.initializers.get(full)
        return existing if existing is not None else add_initializer(self.graph, full, np.asarray(values, dtype=np.int64))

    def _op(self, op_type: str, inputs, name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=f"sa.cache.{name}")
        self.graph.insert_before(self.before, node)
        return node.outputs[0]

    def cache_shape(self, kv_heads: int, head_dim: int) -> ir.Value:
        """The shape a concatenated past of these dimensions would have: [batch, kv_heads, past, head_dim]."""
        key = (kv_heads, head_dim)
        if key not in self._cache_shapes:
            parts = [self.batch, self._const(f"kv{kv_heads}", [kv_heads]), self.past, self._const(f"d{head_dim}", [head_dim])]
            self._cache_shapes[key] = self._op("Concat", parts, f"shape_kv{kv_heads}_d{head_dim}", axis=0)
        return self._cache_shapes[key]


def _axis(node: ir.Node, rank: int = 4) -> int:
    axis = node.attributes["axis"].value
    return axis + rank if axis < 0 else axis


class InPlaceCachePass(ir.passes.InPlacePass):
    """Replace every cache Concat by a TensorScatter write and a Slice of the filled part."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pasts = [past for kinds in cache_layers(graph).values() for past in kinds.values()]
        if not pasts:
            return ir.passes.PassResult(model, False)
        inputs = {v.name: v for v in graph.inputs}
        shapes = _Shapes(graph, next(iter(graph)))
        outputs = list(graph.outputs)
        for name in pasts:
            past = inputs[name]
            kv_heads, head_dim = past.shape[1], past.shape[3]
            concat = None
            for use in list(past.uses()):
                node = use.node
                if node.op_type == "Shape":
                    self._replace_shape_read(graph, node, shapes.cache_shape(kv_heads, head_dim))
                elif node.op_type == "Concat" and _axis(node) == 2 and use.idx == 0:
                    concat = node
                else:
                    raise AttentionPatternError(None, f"{name} is read by {node.op_type} {node.name!r}; only Shape and the cache Concat are expected")
            if concat is None:
                raise AttentionPatternError(None, f"{name} has no Concat on axis 2 to write in place")
            self._write_in_place(graph, concat, past, shapes, outputs)
            past.shape = ir.Shape([past.shape[0], kv_heads, CAPACITY_DIM, head_dim])
        model.opset_imports[""] = max(model.opset_imports.get("", 0), TENSOR_SCATTER_OPSET)
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _replace_shape_read(graph: ir.Graph, shape_node: ir.Node, cache_shape: ir.Value) -> None:
        start = shape_node.attributes.get("start")
        end = shape_node.attributes.get("end")
        starts = np.asarray([start.value if start is not None else 0], dtype=np.int64)
        ends = np.asarray([end.value if end is not None else 4], dtype=np.int64)
        prefix = f"sa.cache.{shape_node.name}"
        sliced = ir.node(
            "Slice",
            [cache_shape, add_initializer(graph, f"{prefix}.starts", starts), add_initializer(graph, f"{prefix}.ends", ends)],
            name=f"{prefix}.from_inputs",
        )
        graph.insert_before(shape_node, sliced)
        ir.convenience.replace_all_uses_with(shape_node.outputs[0], sliced.outputs[0])
        sliced.outputs[0].type = shape_node.outputs[0].type
        sliced.outputs[0].shape = shape_node.outputs[0].shape
        graph.remove(shape_node, safe=True)

    @staticmethod
    def _write_in_place(graph: ir.Graph, concat: ir.Node, past: ir.Value, shapes: _Shapes, outputs: list[ir.Value]) -> None:
        new_rows = concat.inputs[1]
        prefix = f"sa.cache.{past.name}"
        scatter = ir.node("TensorScatter", [past, new_rows, shapes.write_indices], attributes={"axis": -2}, name=f"{prefix}.write")
        zero = add_initializer(graph, f"{prefix}.filled_start", np.asarray([0], dtype=np.int64))
        axis = add_initializer(graph, f"{prefix}.filled_axis", np.asarray([2], dtype=np.int64))
        filled = ir.node("Slice", [scatter.outputs[0], zero, shapes.total, axis], name=f"{prefix}.filled")
        graph.insert_before(concat, [scatter, filled])
        old = concat.outputs[0]
        if old in outputs:  # the graph output first: it becomes the written buffer
            written = scatter.outputs[0]
            graph.outputs[list(graph.outputs).index(old)] = written
            written.type = past.type
            written.shape = ir.Shape([past.shape[0], past.shape[1], CAPACITY_DIM, past.shape[3]])
            name, old.name = old.name, None
            written.name = name
        ir.convenience.replace_all_uses_with(old, filled.outputs[0])
        filled.outputs[0].type = old.type
        filled.outputs[0].shape = old.shape
        graph.remove(concat, safe=True)


def writes_caches_in_place(graph: ir.Graph) -> bool:
    """Whether the graph's presents are its pasts' buffers written by TensorScatter."""
    return any(
        v.name.startswith("present.") and v.producer() is not None and v.producer().op_type == "TensorScatter" for v in graph.outputs
    )

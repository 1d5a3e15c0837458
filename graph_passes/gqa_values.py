"""V-only attention of shared heads on GroupQueryAttention graphs: their V columns written in
place into a cache buffer, times borrowed probabilities (share_gqa, gqa_kv_groups)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.gqa_layers import PAST_VALUE, SEQLENS_K, TOTAL_LEN, GqaLayer, NodeBuilder
from graph_passes.gqa_phases import if_by_phase
from graph_passes.projections import column_select, head_columns


@dataclasses.dataclass(frozen=True)
class Positions:
    """Values every shared layer reads, computed once for the graph."""

    write_indices: ir.Value  # where this step's rows go in the cache buffer, as GQA writes them
    pads: ir.Value  # widen probabilities from total_sequence_length to the buffer's max_length
    grouped_shape: ir.Value  # [0, kv, rep, S, -1]: probabilities grouped by the KV head they read
    is_step: ir.Value  # one query row (a decode step): a scalar bool
    past_ends: list[ir.Value]  # per KV head g: [g + 1, total_sequence_length - S], to slice a cache's rows before this step
    past_end: ir.Value  # [total_sequence_length - S]
    query_len: ir.Value  # [S]


def cache_positions(graph: ir.Graph, first: GqaLayer) -> Positions:
    gqa = first.node
    b = NodeBuilder(graph, gqa, "sa.cache")
    seqlens_k, total = gqa.inputs[SEQLENS_K], gqa.inputs[TOTAL_LEN]
    # The sequence length of this step, from the hidden states (the QKV MatMul goes away).
    query_len = b.op("Shape", [first.qkv.inputs[0]], "query_len", start=1, end=2)
    # GQA's past length per row: seqlens_k + 1 - S, and 0 on the first prompt.
    seqlens = b.op("Cast", [seqlens_k], "seqlens_i64", to=ir.DataType.INT64)
    past = b.op("Sub", [b.op("Add", [seqlens, b.const("one", np.int64(1))], "total_per_row"), query_len], "past_per_row")
    write_indices = b.op("Max", [past, b.const("zero", np.zeros(1, np.int64))], "write_indices")
    buffer_len = b.op("Shape", [gqa.inputs[PAST_VALUE]], "buffer_len", start=2, end=3)
    total_1d = b.op("Reshape", [total, b.const("shape1", np.array([1], np.int64))], "total_1d")
    total_i64 = b.op("Cast", [total_1d], "total_i64", to=ir.DataType.INT64)
    pad_tail = b.op("Sub", [buffer_len, total_i64], "pad_tail")
    pads = b.op("Concat", [b.const("pad_head", np.zeros(7, np.int64)), pad_tail], "probs_pads", axis=0)
    kv, rep = first.kv_num_heads, first.num_heads // first.kv_num_heads
    grouped_shape = b.op(
        "Concat", [b.const("grouped_lead", np.array([0, kv, rep], np.int64)), query_len, b.const("minus_one", np.array([-1], np.int64))],
        "grouped_shape", axis=0,
    )
    is_one = b.op("Equal", [query_len, b.const("one_row", np.array([1], np.int64))], "is_one_row")
    is_step = b.op("Reshape", [is_one, b.const("scalar_shape", np.zeros(0, np.int64))], "is_step")
    past_end = b.op("Sub", [total_i64, query_len], "past_end")
    # Unused ones (no cross-group head maps) go with RemoveUnusedNodesPass.
    past_ends = [b.op("Concat", [b.const(f"head{g}_end", np.array([g + 1], np.int64)), past_end], f"kv{g}_past_ends", axis=0) for g in range(kv)]
    return Positions(write_indices, pads, grouped_shape, is_step, past_ends, past_end, query_len)


def values_attention(b: NodeBuilder, layer: GqaLayer, groups: list[int], past_value: ir.Value, probs: ir.Value | Callable, positions: Positions,
                     recompute: Callable | None, head_slots: list[int] | None) -> tuple[ir.Value, ir.Value]:
    """The attention of the heads of KV groups ``groups`` on borrowed probabilities: the V
    columns of those groups, written in place into ``past_value``; returns the context
    [B, S, heads of groups * head_dim] and the written V buffer."""
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    columns = head_columns(groups, d, n + kv)
    v = column_select(b.graph, b.before, layer.qkv, columns, f"{b.prefix}.v_proj")
    if layer.bias is not None:
        v_bias = np.ascontiguousarray(layer.bias.inputs[1].const_value.numpy()[..., columns])
        v = b.op("Add", [v, b.const("v_proj.bias", v_bias)], "v_proj_bias")
    v_rows = v
    v = b.op("Reshape", [v, b.const("v_heads_shape", np.array([0, 0, len(groups), d], np.int64))], "v_heads")
    v = b.op("Transpose", [v], "v_bnsd", perm=[0, 2, 1, 3])
    present_value = b.op("TensorScatter", [past_value, v, positions.write_indices], "write_v_cache", axis=2)
    dtype = layer.node.outputs[0].dtype

    def grouped(builder: NodeBuilder) -> ir.Value:
        return probs(builder) if callable(probs) else probs

    if recompute is None:
        return probs_times_values(b, layer, grouped(b), present_value, head_slots, len(groups)), present_value

    def step(branch: NodeBuilder) -> list[ir.Value]:
        context = probs_times_values(branch, layer, grouped(branch), present_value, head_slots, len(groups))
        context.dtype = dtype
        return [context]

    context = if_by_phase(b, positions.is_step, "attention_by_phase", step, lambda branch: [recompute(branch, layer, v_rows, present_value)], 1).outputs[0]
    context.dtype = dtype
    return context, present_value


def probs_times_values(b: NodeBuilder, layer: GqaLayer, grouped: ir.Value, present_value: ir.Value, head_slots: list[int] | None = None,
                       kv: int | None = None) -> ir.Value:
    """The padded, grouped probabilities times the V buffer: [B, S, heads * head_dim].

    ``head_slots``: ``grouped`` is [B, kv, rows, S, T] with rows < heads / kv, and head h
    takes output row ``head_slots[h]`` (counted over kv * rows). ``kv``: the KV groups
    the V buffer holds (default all the layer's), each with its heads."""
    kv = kv or layer.kv_num_heads
    n, d = kv * (layer.num_heads // layer.kv_num_heads), layer.head_dim
    # [B, kv, rep, S, T] @ [B, kv, 1, T, D]: each query head reads its KV head's cache by
    # broadcasting (no repeated V). One row per product lets decode (S = 1) take MLAS's GEMV
    # path, which reads V as it is; [B, kv, rep * S, T] @ [B, kv, T, D] packs V on every call.
    v_grouped = b.op("Reshape", [present_value, b.const("v_grouped_shape", np.array([0, kv, 1, -1, d], np.int64))], "v_by_kv_head")
    context = b.op("MatMul", [grouped, v_grouped], "probs_v")
    context = b.op("Transpose", [context], "context_bskrd", perm=[0, 3, 1, 2, 4])
    if head_slots is not None:
        context = b.op("Reshape", [context, b.const("rows_shape", np.array([0, 0, -1, d], np.int64))], "context_by_row")
        context = b.op("Gather", [context, b.const("head_slots", np.array(head_slots, np.int64))], "context_by_head", axis=2)
    context = b.op("Reshape", [context, b.const("hidden_shape", np.array([0, 0, n * d], np.int64))], "context")
    return context


def grouped_shape(b: NodeBuilder, positions: Positions, layer: GqaLayer, groups: int, name: str) -> ir.Value:
    """[0, groups, rep, S, -1]: probabilities of ``groups`` KV groups' heads grouped by KV group."""
    lead = b.const(f"{name}_grouped_lead", np.array([0, groups, layer.num_heads // layer.kv_num_heads], np.int64))
    return b.op("Concat", [lead, positions.query_len, b.const(f"{name}_minus_one", np.array([-1], np.int64))], f"{name}_grouped_shape", axis=0)

"""The PyTorch reference of a block-quantized graph: the model with the graph's own weights.

Parity of an int4 graph is judged against the Hugging Face model whose projections and
embedding hold exactly the values the graph's MatMulNBits and GatherBlockQuantized
constants decode to, so that what remains between the two is the runtime's arithmetic,
not the quantization. ONNX Runtime ships no dequantizer for these layouts (its
quantization package only quantizes), so they are decoded here, following the
com.microsoft operator schemas; tests check the decoding against the operators themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from graph_passes.projections import MS_DOMAIN, attribute_values, head_columns, is_matmul_nbits
from sa_export.core.errors import UsageError
from sa_export.core.plan import SharingPlan

# The builder's node names (onnxruntime-genai 0.18) and the SA rewrite's V projection.
_LAYER_PROJECTION = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul_Q4$")
_SHARED_V = re.compile(r"^sa\.layer(\d+)\.v_proj$")
# A partly shared layer's (gqa_kv_groups): its kept heads' packed Q, K, V, and the borrowed groups' V.
_KEPT_QKV = re.compile(r"^sa\.layer(\d+)\.kept_qkv$")
_BORROWED_V = re.compile(r"^sa\.layer(\d+)\.borrowed\.v_proj$")
_LM_HEAD = "/lm_head/MatMul_Q4"
EXACT_ACCURACY_LEVEL = 1  # MatMulNBits: fp32 activations and accumulation


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values packed along the last axis, lowest bits first."""
    if bits == 8:
        return packed.astype(np.int32)
    if bits != 4:
        raise UsageError(f"{bits}-bit weights are not supported; sa-export checks 4- and 8-bit graphs")
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int32)


def _zero_points(zero_points: np.ndarray | None, rows: int, blocks: int, bits: int) -> np.ndarray:
    if zero_points is None:
        return np.full((rows, blocks), 1 << (bits - 1), np.float32)  # the schema's default: the middle of the range
    if zero_points.dtype == np.uint8:
        return _unpack(zero_points.reshape(rows, -1), bits)[:, :blocks].astype(np.float32)
    return zero_points.reshape(rows, blocks).astype(np.float32)  # stored in the scales' dtype


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, columns: int) -> np.ndarray:
    """[rows, columns] float32 from values quantized in blocks of ``block_size`` along each row."""
    rows = packed.shape[0]
    values = _unpack(packed.reshape(rows, -1), bits)
    blocks = -(-columns // block_size)
    values = values[:, : blocks * block_size].reshape(rows, blocks, block_size).astype(np.float32)
    scales = scales.reshape(rows, blocks).astype(np.float32)
    zero = _zero_points(zero_points, rows, blocks, bits)
    return ((values - zero[..., None]) * scales[..., None]).reshape(rows, -1)[:, :columns]


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None else value.const_value.numpy()


def dequantize_matmul_nbits(node: ir.Node) -> np.ndarray:
    """The weight of a MatMulNBits node as a Linear layer holds it: [N, K]."""
    attrs = attribute_values(node)
    inputs = list(node.inputs) + [None] * 6
    if inputs[4] is not None:
        raise UsageError(f"{node.name!r} reorders its input by g_idx; sa-export checks the builder's RTN int4 graph")
    return dequantize_blocks(_const(inputs[1]), _const(inputs[2]), _const(inputs[3]), attrs["bits"], attrs["block_size"], attrs["K"])


def dequantize_gather(node: ir.Node) -> np.ndarray:
    """The embedding table of a GatherBlockQuantized node (quantized along its rows): [vocab, hidden]."""
    attrs = attribute_values(node)
    if attrs.get("quantize_axis", 1) != 1 or attrs.get("gather_axis", 0) != 0:
        raise UsageError(f"{node.name!r} is not a row-quantized embedding")
    data = node.inputs[0]
    while data.const_value is None and data.producer() is not None and data.producer().op_type == "Reshape":
        data = data.producer().inputs[0]  # the builder ties the table to lm_head's packed weight by a Reshape
    scales = _const(node.inputs[2])
    bits, block = attrs.get("bits", 4), attrs.get("block_size", 128)
    zero = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    return dequantize_blocks(_const(data), scales, zero, bits, block, scales.shape[1] * block)


def graph_weights(graph: ir.Graph, config, plan: SharingPlan | None = None) -> dict[str, np.ndarray | dict[int, np.ndarray]]:
    """Hugging Face parameter name -> the weight the graph holds for it, dequantized; for
    the projections of a partly shared layer (``plan``), which the graph holds in part,
    {output row: row} of the rows it holds."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weights: dict[str, np.ndarray | dict[int, np.ndarray]] = {}

    def rows_of(name: str, groups, weight: np.ndarray, per_group: int = 1) -> None:
        rows = head_columns([g * per_group + i for g in groups for i in range(per_group)], head_dim)
        weights.setdefault(name, {}).update(zip(rows.tolist(), weight))
    for node in graph:
        if node.op_type == "GatherBlockQuantized" and node.domain == MS_DOMAIN:
            weights["model.embed_tokens.weight"] = dequantize_gather(node)
            continue
        if not is_matmul_nbits(node):
            continue
        name = node.name or ""
        if name == _LM_HEAD:
            weights["lm_head.weight"] = dequantize_matmul_nbits(node)
        elif match := _SHARED_V.match(name):
            weights[f"model.layers.{match.group(1)}.self_attn.v_proj.weight"] = dequantize_matmul_nbits(node)
        elif (match := _KEPT_QKV.match(name) or _BORROWED_V.match(name)) and plan is not None:
            layer = int(match.group(1))
            prefix, weight = f"model.layers.{layer}.self_attn", dequantize_matmul_nbits(node)
            if name.endswith(".borrowed.v_proj"):
                rows_of(f"{prefix}.v_proj.weight", plan.shared_groups[layer], weight)
                continue
            groups, rep = plan.kept_groups(layer), heads // kv_heads
            q, k = len(groups) * rep * head_dim, len(groups) * head_dim
            rows_of(f"{prefix}.q_proj.weight", groups, weight[:q], rep)
            rows_of(f"{prefix}.k_proj.weight", groups, weight[q : q + k])
            rows_of(f"{prefix}.v_proj.weight", groups, weight[q + k :])
        elif match := _LAYER_PROJECTION.match(name):
            layer, block, projection = match.groups()
            prefix = f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}"
            weight = dequantize_matmul_nbits(node)
            if projection == "qkv_proj":
                q, k = heads * head_dim, kv_heads * head_dim
                weights[f"{prefix}.q_proj.weight"], weights[f"{prefix}.k_proj.weight"] = weight[:q], weight[q : q + k]
                weights[f"{prefix}.v_proj.weight"] = weight[q + k :]
            else:
                weights[f"{prefix}.{projection}.weight"] = weight
    return weights


def exact_arithmetic_graph(onnx_path: Path) -> bytes:
    """The graph with every MatMulNBits computing in fp32 (accuracy_level 1), serialized
    without its weights: the same constants, without the int8 activations of level 4."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", EXACT_ACCURACY_LEVEL)])
    return model.SerializeToString()


def load_graph_weights(hf_model, graph: ir.Graph, plan: SharingPlan, where: str | Path) -> int:
    """Put the graph's dequantized weights into ``hf_model``; the number of tensors loaded.

    Every Linear layer must be found, except the Q/K projections of shared layers, which the
    SA graph no longer holds and the reference does not use. The embedding is loaded when
    the graph quantizes it (a full-precision table is the model's own). ``where`` names the
    graph's file in errors.
    """
    weights = graph_weights(graph, hf_model.config, plan)
    parameters = dict(hf_model.named_parameters(remove_duplicate=False))
    unused = {f"model.layers.{layer}.self_attn.{qk}_proj.weight" for layer in plan.shared_layers for qk in "qk"}
    linear = {f"{name}.weight" for name, module in hf_model.named_modules(remove_duplicate=False) if isinstance(module, torch.nn.Linear)}
    expected = linear - unused
    missing = sorted(expected - set(weights))
    unknown = sorted(set(weights) - set(parameters))
    if missing or unknown:
        what = f"no quantized weight for {', '.join(missing[:3])}" if missing else f"weights for unknown parameters {', '.join(unknown[:3])}"
        raise UsageError(f"the quantized graph {where} does not map onto {hf_model.config.model_type}: {what}")
    with torch.no_grad():
        for name, weight in weights.items():
            parameter = parameters[name]
            if isinstance(weight, dict):  # rows of a partly shared layer's projection; V has every row, Q and K the kept heads'
                if name.endswith("v_proj.weight") and len(weight) != parameter.shape[0]:
                    raise UsageError(f"the quantized graph holds {len(weight)} of the {parameter.shape[0]} rows of {name}")
                rows = sorted(weight)
                weight = parameter.detach().float().numpy().copy()
                weight[rows] = np.stack([weights[name][r] for r in rows])
            if tuple(parameter.shape) != weight.shape:
                raise UsageError(f"the quantized graph's {name} is {weight.shape}, the model's {tuple(parameter.shape)}")
            parameter.copy_(torch.from_numpy(weight).to(parameter.dtype))
    return len(weights)

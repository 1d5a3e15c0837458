"""Find one attention block per layer in a decomposed-attention ONNX graph.

Detection is structural: a block is a Softmax whose input comes from a MatMul of
two activations (Q K^T, through scale / mask / softcap arithmetic) and whose output
feeds, through casts, the left side of another MatMul (probs @ V). The layer of a
block is read from the cache tensors its K and V paths concatenate, whose names are
the model's I/O contract (``past_key_values.N.key`` / ``present.N.key``), not from
node names, which differ between exporters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from sa_export.core.cache_names import PAST_RE, PRESENT_RE, past_name, present_name
from sa_export.core.errors import AttentionPatternError


# Ops that sit between the Softmax and the probs @ V MatMul without changing values.
_PASSTHROUGH = {"Cast", "Identity", "Dropout"}
# Ops between Q K^T and the Softmax: scaling, mask add, softcapping, dtype changes.
SCORE_ARITHMETIC = {"Mul", "Div", "Add", "Sub", "Tanh", "Cast", "Where"}
_MAX_CACHE_SEARCH = 40


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """The tensors of one layer's attention, as found in the graph."""

    layer: int
    scores_matmul: ir.Node  # Q @ K^T
    softmax: ir.Node
    probs: ir.Value  # post-softmax probabilities as the context MatMul reads them
    context_matmul: ir.Node  # probs @ V
    past_key: str | None
    past_value: str | None
    present_key: str | None
    present_value: str | None

    def describe(self) -> str:
        return (
            f"layer {self.layer}: softmax {self.softmax.name!r}, scores {self.scores_matmul.name!r}, "
            f"context {self.context_matmul.name!r}, cache {self.past_key}/{self.past_value}"
        )


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _context_matmuls(softmax: ir.Node) -> list[tuple[ir.Node, ir.Value]]:
    """MatMuls that read the softmax output (through passthrough ops) as their left operand.

    An anchor in an already shared graph has several: its own probs @ V and those of
    the layers that share it.
    """
    found = []
    frontier = [softmax.outputs[0]]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node, index = use.node, use.idx
            if node.op_type == "MatMul" and index == 0:
                found.append((node, value))
            elif node.op_type in _PASSTHROUGH and index == 0:
                frontier.append(node.outputs[0])
    return found


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk up from the softmax through score arithmetic to the Q @ K^T MatMul."""
    frontier = [softmax.inputs[0]]
    seen: set[int] = set()
    while frontier:
        value = frontier.pop(0)
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            continue
        if node.op_type == "MatMul":
            if not _is_constant(node.inputs[0]) and not _is_constant(node.inputs[1]):
                return node
            continue
        if node.op_type in SCORE_ARITHMETIC:
            frontier.extend(v for v in node.inputs if not _is_constant(v))
    return None


def _cache_names(
    start: ir.Value | None, kind: str, graph_inputs: set[str], graph_outputs: set[str]
) -> tuple[int, str | None] | None:
    """Search upstream of a K or V operand for the cache tensor of ``kind`` ("key"/"value").

    Returns (layer, past input name or None).
    """
    frontier = [start]
    seen: set[int] = set()
    steps = 0
    while frontier and steps < _MAX_CACHE_SEARCH:
        value = frontier.pop(0)
        steps += 1
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        name = value.name or ""
        match = PRESENT_RE.match(name)
        if match and match.group(2) == kind and name in graph_outputs:
            past = past_name(int(match.group(1)), kind)
            return int(match.group(1)), past if past in graph_inputs else None
        match = PAST_RE.match(name)
        if match and match.group(2) == kind and name in graph_inputs:
            return int(match.group(1)), name
        node = value.producer()
        if node is None or node.op_type == "MatMul" and _is_constant(node.inputs[1]):
            continue  # stop at projections: the cache lies between them and attention
        frontier.extend(node.inputs)
    return None


# Fused attention ops of runtime-specific domains that no pass rewrites yet.
FUSED_ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"}


def refuse_fused_attention(graph: ir.Graph) -> None:
    """Name the first fused attention node (and its layer) that the passes cannot rewrite."""
    for node in graph.all_nodes():
        if node.domain == "com.microsoft" and node.op_type in FUSED_ATTENTION_OPS:
            layers = [int(m.group(1)) for v in node.inputs if v is not None for m in [PAST_RE.match(v.name or "")] if m]
            raise AttentionPatternError(
                layers[0] if layers else None,
                f"{node.domain} {node.op_type} {node.name!r} is a fused runtime-specific attention that no pass handles yet; "
                "re-export with decomposed attention (`sa-export convert HF_DIR`)",
            )


def find_attention_blocks(graph: ir.Graph) -> list[AttentionBlock]:
    """One AttentionBlock per layer that still computes its own attention, sorted by layer."""
    inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    blocks: dict[int, AttentionBlock] = {}
    for softmax in _iter_nodes(graph, "Softmax"):
        contexts = _context_matmuls(softmax)
        if not contexts:
            continue  # a softmax that is not attention (for example a router)
        scores = _scores_matmul(softmax)
        if scores is None:
            raise AttentionPatternError(None, f"softmax {softmax.name!r} feeds probs @ V but no Q @ K^T MatMul was found above it")
        key = _cache_names(scores.inputs[1], "key", inputs, outputs)
        # The layer's own probs @ V is the one whose V cache belongs to the same layer as its K cache.
        value = context_matmul = probs = None
        for candidate, candidate_probs in contexts:
            found = _cache_names(candidate.inputs[1], "value", inputs, outputs)
            if found is not None and (key is None or found[0] == key[0] or len(contexts) == 1):
                value, context_matmul, probs = found, candidate, candidate_probs
                break
        if value is None or key is None:
            raise AttentionPatternError(
                None,
                f"attention at softmax {softmax.name!r} reads no past_key_values/present cache; "
                "export the model with past key values (task text-generation-with-past)",
            )
        layer = value[0]
        if key[0] != layer:
            raise AttentionPatternError(layer, f"K cache of layer {key[0]} and V cache of layer {layer} meet in one attention")
        if layer in blocks:
            raise AttentionPatternError(layer, "two attention softmaxes read this layer's cache")
        blocks[layer] = AttentionBlock(
            layer=layer,
            scores_matmul=scores,
            softmax=softmax,
            probs=probs,
            context_matmul=context_matmul,
            past_key=key[1],
            past_value=value[1],
            present_key=present_name(layer, "key") if present_name(layer, "key") in outputs else None,
            present_value=present_name(layer, "value") if present_name(layer, "value") in outputs else None,
        )
    return [blocks[k] for k in sorted(blocks)]


def cache_layers(graph: ir.Graph) -> dict[int, dict[str, str]]:
    """Cache inputs per layer: {layer: {"key": name, "value": name}} as the graph declares them."""
    layers: dict[int, dict[str, str]] = {}
    for value in graph.inputs:
        match = PAST_RE.match(value.name or "")
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value.name
    return layers


def _iter_nodes(graph: ir.Graph, op_type: str) -> Iterable[ir.Node]:
    return (node for node in graph if node.op_type == op_type and node.domain in ("", "ai.onnx"))

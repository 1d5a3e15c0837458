"""One pass sequence per graph family, built with onnx-ir's pass manager.

decomposed               MatMul/Softmax/MatMul attention (dynamo export; the ONNX
                         Attention op is unfused first), caches concatenated each step.
group-query-attention    com.microsoft GroupQueryAttention over in-place cache buffers
                         (onnxruntime-genai's builder).

Convert and the bench baseline run the same sequence; the baseline's plan shares nothing.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateInitializersPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from graph_passes.attention_blocks import cache_layers, find_attention_blocks, refuse_fused_attention
from graph_passes.contracts import ensure_full_io_types, io_types, require_cache_for
from graph_passes.drop_k_cache import DropKCachePass
from graph_passes.fp32_softmax import Fp32SoftmaxPass
from graph_passes.in_place_cache import InPlaceCachePass
from graph_passes.narrow_projections import (
    NarrowInterleavedProjectionsPass,
    NarrowSlicedProjectionsPass,
    NarrowSplitProjectionsPass,
    ShapeFromLiveSplitOutputPass,
)
from graph_passes.gqa_layers import find_gqa_layers, is_gqa_graph
from graph_passes.share_gqa import ShareGqaPass
from graph_passes.share_kv_groups import SharePartOfLayerPass
from graph_passes.share_probabilities import ShareProbabilitiesPass
from graph_passes.unfuse_attention import UnfuseAttentionPass
from sa_export.core.cache_names import past_name
from sa_export.core.errors import AttentionPatternError, SAExportError
from sa_export.core.plan import SharingPlan

DECOMPOSED = "decomposed"
GROUP_QUERY_ATTENTION = "group-query-attention"


def graph_family(graph: ir.Graph) -> str:
    return GROUP_QUERY_ATTENTION if is_gqa_graph(graph) else DECOMPOSED


class SharingSequence(ir.passes.PassManager):
    """A family's passes for one plan, with the conditions of the whole rewrite.

    requires: the graph has a cache for every layer of the plan.
    ensures:  every graph input and output keeps its full type and shape; no shared
              layer keeps a K cache, scores or Softmax of its own.
    """

    def __init__(self, passes: list[ir.passes.PassBase], plan: SharingPlan):
        super().__init__(passes, steps=1)
        self.plan = plan
        self._io_before: dict[str, tuple] = {}
        self._shared_blocks: list = []

    def requires(self, model: ir.Model) -> None:
        if is_gqa_graph(model.graph):
            find_gqa_layers(model.graph)  # names the first layer whose form the rewrite does not handle
        require_cache_for(model, self.plan.num_layers)
        self._io_before = io_types(model)
        if not is_gqa_graph(model.graph):
            self._shared_blocks = [b for b in find_attention_blocks(model.graph) if b.layer in self.plan.whole_layers]

    def ensures(self, model: ir.Model) -> None:
        ensure_full_io_types(model, self._io_before)
        inputs = {v.name: v for v in model.graph.inputs}
        for layer in self.plan.whole_layers:
            if past_name(layer, "key") in inputs:
                raise AttentionPatternError(layer, "the shared layer still has its K cache after the rewrite")
        for layer in self.plan.shared_groups:
            past = inputs.get(past_name(layer, "key"))
            if past is None or past.shape[1] != len(self.plan.kept_groups(layer)):
                raise AttentionPatternError(layer, f"the partly shared layer's K cache does not hold its {len(self.plan.kept_groups(layer))} kept KV groups")
        remaining = set(map(id, model.graph))
        for block in self._shared_blocks:
            for node in (block.scores_matmul, block.softmax):
                if id(node) in remaining:
                    raise AttentionPatternError(block.layer, f"{node.op_type} {node.name!r} is still live after sharing")


class _RequireDecomposedAttention(ir.passes.InPlacePass):
    """Precondition of the decomposed family: no fused attention op the passes cannot unfuse."""

    def requires(self, model: ir.Model) -> None:
        refuse_fused_attention(model.graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


class _RequireAttentionPerLayer(ir.passes.InPlacePass):
    """Precondition of sharing on the decomposed family: one attention block per cached layer."""

    def requires(self, model: ir.Model) -> None:
        layers = cache_layers(model.graph)
        found = [b.layer for b in find_attention_blocks(model.graph)]
        if found != sorted(layers):
            missing = sorted(set(layers) - set(found))
            raise AttentionPatternError(missing[0] if missing else None, "no decomposed attention (MatMul/Softmax/MatMul) found for this layer")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def sharing_sequence(family: str, plan: SharingPlan, precision: str = "fp32", in_place_cache: bool = False) -> SharingSequence:
    """The passes that apply ``plan`` to a graph of ``family`` in ``precision``; with
    ``in_place_cache`` (decomposed family) the caches become buffers written by TensorScatter."""
    if family == GROUP_QUERY_ATTENTION:
        # The rewrite adds many small constants (indices, shapes), often equal; ONNX Runtime
        # holds each initializer of a loaded session on its own (about 2 KB each).
        return SharingSequence([ShareGqaPass(plan), RemoveUnusedNodesPass(), DeduplicateInitializersPass()], plan)
    passes: list[ir.passes.PassBase] = [_RequireDecomposedAttention(), UnfuseAttentionPass(), _RequireAttentionPerLayer()]
    if precision == "fp16":
        passes.append(Fp32SoftmaxPass())  # after unfusing, so that every Softmax is found
    passes += [
        SharePartOfLayerPass(plan),  # first: a later layer's map may read the heads a partly shared layer keeps
        ShareProbabilitiesPass(plan),
        DropKCachePass(plan),
        RemoveUnusedNodesPass(),
        ShapeFromLiveSplitOutputPass(),
        NarrowSlicedProjectionsPass(),
        NarrowSplitProjectionsPass(),
        NarrowInterleavedProjectionsPass(),
        RemoveUnusedNodesPass(),
        RemoveUnusedOpsetsPass(),
    ]
    if in_place_cache:
        passes += [InPlaceCachePass(), RemoveUnusedNodesPass()]
    return SharingSequence(passes, plan)


def run_sequence(sequence: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassResult:
    """Run a sequence; an sa-export error raised inside a pass reaches the caller as itself,
    not wrapped in the pass manager's PassError."""
    try:
        return sequence(model)
    except (ir.passes.PassError, ir.passes.InvariantError) as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, SAExportError):
                raise cause from None
            cause = cause.__cause__
        raise

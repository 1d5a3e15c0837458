"""ONNX graph passes for Shared Attention, one concern per module, built on onnx-ir.

`sequences` assembles them into one pass manager per graph family; `apply` runs it.
"""

from graph_passes.apply import RewriteReport, apply_sharing_plan, initializer_bytes, recorded_plan
from graph_passes.attention_blocks import AttentionBlock, cache_layers, find_attention_blocks
from graph_passes.drop_k_cache import DropKCachePass
from graph_passes.fp32_softmax import Fp32SoftmaxPass
from graph_passes.in_place_cache import InPlaceCachePass, writes_caches_in_place
from graph_passes.sequences import DECOMPOSED, GROUP_QUERY_ATTENTION, graph_family, run_sequence, sharing_sequence
from graph_passes.share_gqa import ShareGqaPass
from graph_passes.share_kv_groups import SharePartOfLayerPass
from graph_passes.share_probabilities import ShareProbabilitiesPass

__all__ = [
    "DECOMPOSED",
    "GROUP_QUERY_ATTENTION",
    "AttentionBlock",
    "DropKCachePass",
    "Fp32SoftmaxPass",
    "InPlaceCachePass",
    "RewriteReport",
    "ShareGqaPass",
    "SharePartOfLayerPass",
    "ShareProbabilitiesPass",
    "apply_sharing_plan",
    "cache_layers",
    "find_attention_blocks",
    "graph_family",
    "initializer_bytes",
    "recorded_plan",
    "run_sequence",
    "sharing_sequence",
    "writes_caches_in_place",
]

"""ONNX graph passes for Shared Attention, one concern per module, built on onnx-ir."""

from graph_passes.apply import RewriteReport, apply_sharing_plan, recorded_plan
from graph_passes.attention_blocks import AttentionBlock, cache_layers, find_attention_blocks
from graph_passes.drop_k_cache import DropKCachePass
from graph_passes.fp32_softmax import Fp32SoftmaxPass
from graph_passes.share_probabilities import ShareProbabilitiesPass

__all__ = [
    "AttentionBlock",
    "DropKCachePass",
    "Fp32SoftmaxPass",
    "RewriteReport",
    "ShareProbabilitiesPass",
    "apply_sharing_plan",
    "cache_layers",
    "find_attention_blocks",
    "recorded_plan",
]

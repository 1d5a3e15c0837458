"""The PyTorch SA reference: the same plan applied to the Hugging Face model.

Attention is patched through transformers' attention-function registry: every layer
runs the model's own eager attention, anchors keep their post-softmax probabilities,
and shared layers compute ``P_anchor @ repeat_kv(V_own)`` instead. This is the
ground truth for parity, and what ``eval`` measures.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.core.plan import HeadMap, SharingPlan

IMPLEMENTATION = "sa_reference"


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    batch, kv_heads, length, head_dim = states.shape
    if groups == 1:
        return states
    expanded = states[:, :, None].expand(batch, kv_heads, groups, length, head_dim)
    return expanded.reshape(batch, kv_heads * groups, length, head_dim)


def _model_eager_attention(module):
    """The eager attention function of the module's own modeling file (softcapping etc. included)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def shared_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """Signature-agnostic: arguments pass through to the model's own eager attention."""
    state = getattr(module, "_sa_state", None)
    layer = module.layer_idx
    if state is None or layer not in state.plan.anchors:
        output, probs = _model_eager_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)
        if state is not None and layer in state.anchor_layers:
            state.probs[layer] = probs
        return output, probs
    head_map = state.plan.head_map(layer)
    if head_map is None:
        probs = state.probs[state.plan.anchors[layer]]
    else:
        probs = mix_probs(state.probs, head_map, state.weights.get(layer), state.log_temperatures.get(layer))
    heads = state.shared_heads.get(layer)
    if heads is not None:  # only these query heads borrow; the others attend as the model does
        _, own = _model_eager_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)
        borrowed = torch.zeros(own.shape[1], dtype=torch.bool, device=own.device)
        borrowed[list(heads)] = True
        probs = torch.where(borrowed[None, :, None, None], probs.to(own.dtype), own)
        if layer in state.anchor_layers:  # its own heads may be a later layer's sources
            state.probs[layer] = probs
    values = _repeat_kv(value, query.shape[1] // value.shape[1])
    output = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()
    return output, probs


def mix_probs(
    stored: dict[int, torch.Tensor], head_map: HeadMap, weights: torch.Tensor | None = None, log_temperature: torch.Tensor | None = None
) -> torch.Tensor:
    """The same computation as the graph's Concat / Gather / mixture MatMul.

    ``weights`` ([heads, width], e.g. being fitted) replace the head map's own.
    ``log_temperature`` ([heads]; PyTorch only, no graph applies it): each head's mixture,
    as a distribution, is raised to exp(t) and renormalized, then keeps its gain.
    """
    layers = head_map.layers
    stacked = torch.cat([stored[layer] for layer in layers], dim=1)
    heads = stored[layers[0]].shape[1]
    index = torch.tensor([[layers.index(l) * heads + h for l, h in src] for src in head_map.sources], device=stacked.device)
    picked = stacked[:, index]  # [batch, heads, k, q, kv]
    if head_map.width == 1 and weights is None and all(w == (1.0,) for w in head_map.weights):
        mixed = picked[:, :, 0]
    else:
        if weights is None:
            weights = torch.tensor(head_map.weights, device=picked.device)
        mixed = (picked * weights.to(picked.dtype)[None, :, :, None, None]).sum(2)
    return mixed if log_temperature is None else _sharpen(mixed, log_temperature)


def _sharpen(mixed: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """p ** exp(t) / sum, per head, times the row's own sum (the gain); masked zeros stay zero
    (through ``where``: 0 ** t has no gradient in t)."""
    positive = mixed > 0
    logs = torch.log(torch.where(positive, mixed, torch.ones_like(mixed)))
    powered = torch.where(positive, torch.exp(torch.exp(log_temperature).to(mixed.dtype)[None, :, None, None] * logs), torch.zeros_like(mixed))
    return powered / powered.sum(-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny) * mixed.sum(-1, keepdim=True)


class _SharingState:
    def __init__(self, plan: SharingPlan, weights=None, log_temperatures=None, shared_heads=None):
        self.plan = plan
        self.weights = weights or {}
        self.log_temperatures = log_temperatures or {}
        self.shared_heads = {**plan.shared_heads, **(shared_heads or {})}  # the plan's partly shared layers, unless told
        self.anchor_layers = set(plan.anchor_layers)
        self.probs: dict[int, torch.Tensor] = {}


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(IMPLEMENTATION, shared_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
        _registered = True
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise EnvironmentProblem(f"the installed transformers did not register the {IMPLEMENTATION!r} attention mask; use the pinned transformers")


def attention_modules(model) -> list:
    """Self-attention modules: they carry their layer index (every supported architecture does)."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if len(modules) != model.config.num_hidden_layers:
        raise UsageError(
            f"found {len(modules)} attention modules with a layer index for {model.config.num_hidden_layers} layers; "
            f"the SA reference does not know this {model.config.model_type} layout"
        )
    return modules


@contextlib.contextmanager
def shared_attention(
    model, plan: SharingPlan | None, weights: dict[int, torch.Tensor] | None = None, log_temperatures: dict[int, torch.Tensor] | None = None,
    shared_heads: dict[int, tuple[int, ...]] | None = None,
):
    """Run ``model`` with the plan applied inside the block (plain eager when plan is None).

    ``weights``: per shared layer, [heads, width] tensors that replace its head map's weights.
    ``log_temperatures``: per shared layer, [heads] (see ``mix_probs``).
    ``shared_heads``: per shared layer, the query heads that borrow (a finer unit of sharing
    than a layer); the layer's other heads keep their own attention. The plan's partly shared
    layers (``SharingPlan.shared_groups``, KV groups, as the graph shares them) are taken
    unless given here; a layer in neither borrows on every head.
    """
    _register()
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    state = _SharingState(plan, weights, log_temperatures, shared_heads) if plan is not None else None
    for module in modules:
        module._sa_state = state
    model.config._attn_implementation = IMPLEMENTATION
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
        for module in modules:
            del module._sa_state

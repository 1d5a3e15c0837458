"""One anchor head per shared head, chosen by what the head outputs (``argmax-out``).

``argmax`` picks the anchor head whose probability map looks most like the head's own
(cosine of the maps). What the layer passes on is the maps times its values, P·V, and
maps that differ where the values are alike cost nothing (an attention sink, say). So
here each shared head h of layer l reads the anchor head j with the least

    sum over calibration chunks of || P_anchor[j] @ V_l[g(h)] - P_l[h] @ V_l[g(h)] ||^2

where V_l are the base model's values of layer l and g(h) the KV head of h. It is a
choice among the anchor's heads, so the graph, and its cost at every step, is argmax's.
"""

from __future__ import annotations

import numpy as np
import torch

from sa_export.accuracy.calibration import CHUNK_TOKENS, calibration_chunks
from sa_export.core.errors import UsageError
from sa_export.core.plan import HeadMap, SharingPlan


def _value_projections(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(layer, "self_attn", None), "v_proj") for layer in layers):
        raise UsageError("--head-map argmax-out reads each layer's self_attn.v_proj, which this model does not have; use argmax")
    return [layer.self_attn.v_proj for layer in layers]


@torch.no_grad()
def output_errors(model, plan: SharingPlan, token_ids: list[int], chunk_tokens: int = CHUNK_TOKENS, progress=None) -> dict[int, np.ndarray]:
    """[heads, anchor heads] summed squared output error of every shared layer of ``plan``."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    chunks = calibration_chunks(token_ids, chunk_tokens)
    values: dict[int, torch.Tensor] = {}
    projections = _value_projections(model)
    hooks = [
        projections[layer].register_forward_hook(lambda module, args, out, layer=layer: values.__setitem__(layer, out[0].detach()))
        for layer in plan.anchors
    ]
    errors = {layer: np.zeros((heads, heads)) for layer in plan.anchors}
    try:
        for number, chunk in enumerate(chunks):
            attentions = model(input_ids=torch.tensor([chunk]), output_attentions=True).attentions
            for layer, anchor in plan.anchors.items():
                v = values[layer].reshape(len(chunk), kv_heads, head_dim).transpose(0, 1).double()  # [kv, T, d]
                own = attentions[layer][0].double()  # [heads, T, T]
                borrowed = torch.einsum("jqk,gkd->jgqd", attentions[anchor][0].double(), v)  # [anchor heads, kv, T, d]
                for h in range(heads):
                    g = h // (heads // kv_heads)
                    target = own[h] @ v[g]
                    errors[layer][h] += ((borrowed[:, g] - target) ** 2).sum(dim=(1, 2)).numpy()
            if progress is not None:
                progress(number + 1, len(chunks))
    finally:
        for hook in hooks:
            hook.remove()
    return errors


def output_head_maps(errors: dict[int, np.ndarray], plan: SharingPlan) -> dict[int, HeadMap]:
    return {layer: HeadMap.from_anchor_heads(plan.anchors[layer], np.argmin(error, axis=1).tolist()) for layer, error in errors.items()}

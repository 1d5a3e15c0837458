"""Attention statistics on calibration text, and head maps calibrated from them.

The statistics are inner products between the post-softmax maps of every pair of
(layer, head), summed over calibration chunks, plus the per-chunk cosine similarity
averaged over chunks (the paper's isotropy measure). Head maps need nothing else:
  argmax      each shared head reads the anchor head most similar to its own map;
  argmax-group  ... among the anchor heads of its own KV group: at prefill the graph
              recomputes it from the anchor's K cache as it is, like an identity map;
  argmax-any  ... the most similar head of any earlier unshared layer of its kind;
  mix         a convex mixture of the TOP_K most similar such heads, fitted by least
              squares on the calibration maps (in the graph: Gather + weighted sum);
  mix-anchor  the same mixture over the anchor's heads only: no other layer has to
              emit its probabilities, so it costs a decode step almost nothing;
  mix-few     the mixture over the heads of the anchors and of the one layer the free
              mixture leans on most: one extra layer emits probabilities.
``fit`` (sa_export.accuracy.distill) starts from mix-few and fits the weights on the
model's output, and ``argmax-out`` (sa_export.accuracy.output_maps) picks argmax's anchor
head by the head's output error: both need the model, not only these statistics.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import torch

from sa_export.core.choices import CALIBRATED_DEFAULT, FITTED_MODES, HEAD_MAP_MODES
from sa_export.core.errors import UsageError
from sa_export.core.plan import HeadMap, SharingPlan

# Measured and kept for the head_maps benchmark, not offered by the CLI: both lose to
# argmax on text of another domain than the calibration's (README, "Head maps").
EXPERIMENTAL_MODES = ("argmax-group", "argmax-out")
FIT_START = "mix-few"
EXTRA_SOURCE_LAYERS = 1  # mix-few: layers besides the anchors whose heads the maps may read
TOP_K = 4
CHUNK_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class AttentionStatistics:
    num_layers: int
    num_heads: int
    gram: np.ndarray  # [L*H, L*H] sum over chunks of <P_a, P_b>
    cosine: np.ndarray  # [L*H, L*H] mean over chunks of cos(P_a, P_b)
    tokens: int
    chunks: int
    group_size: int = 1  # query heads per KV head (grouped-query attention)

    def index(self, layer: int, head: int) -> int:
        return layer * self.num_heads + head

    def layer_similarity(self) -> np.ndarray:
        """[L, L]: cosine of same-index heads, averaged over heads and chunks."""
        heads = self.num_heads
        blocks = self.cosine.reshape(self.num_layers, heads, self.num_layers, heads)
        return np.einsum("ihjh->ij", blocks) / heads

    def adjacent_head_similarity(self) -> np.ndarray:
        """[L-1, H]: cosine of head h in layer i and head h in layer i+1."""
        return np.array(
            [[self.cosine[self.index(i, h), self.index(i + 1, h)] for h in range(self.num_heads)] for i in range(self.num_layers - 1)]
        )


def calibration_chunks(token_ids: list[int], chunk_tokens: int) -> list[list[int]]:
    """Whole chunks of ``chunk_tokens`` (or the one shorter chunk a short text has)."""
    chunks = [token_ids[i : i + chunk_tokens] for i in range(0, len(token_ids), chunk_tokens)]
    chunks = [c for c in chunks if len(c) == chunk_tokens] or chunks[:1]
    if not chunks or len(chunks[0]) < 2:
        raise UsageError("calibration text is too short: it needs at least 2 tokens")
    return chunks


@torch.no_grad()
def collect_statistics(model, token_ids: list[int], chunk_tokens: int = CHUNK_TOKENS, progress=None) -> AttentionStatistics:
    """Run the base model (eager attention) on calibration chunks and accumulate map inner products."""
    chunks = calibration_chunks(token_ids, chunk_tokens)
    gram = cosine = None
    for number, chunk in enumerate(chunks):
        out = model(input_ids=torch.tensor([chunk]), output_attentions=True)
        maps = torch.cat([a[0] for a in out.attentions], dim=0)  # [L*H, q, kv]
        flat = maps.reshape(maps.shape[0], -1).double()
        g = (flat @ flat.T).numpy()
        norms = np.sqrt(np.clip(np.diag(g), 1e-30, None))
        c = g / norms[:, None] / norms[None, :]
        gram = g if gram is None else gram + g
        cosine = c if cosine is None else cosine + c
        if progress is not None:
            progress(number + 1, len(chunks))
    layers, heads = len(out.attentions), out.attentions[0].shape[1]
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    return AttentionStatistics(layers, heads, gram, cosine / len(chunks), sum(map(len, chunks)), len(chunks), heads // kv_heads)


def _simplex_least_squares(gram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin_w w'Gw - 2 t'w with w >= 0 and sum(w) = 1 (a 4-variable QP; SLSQP solves it exactly enough)."""
    from scipy.optimize import minimize

    scale = float(np.abs(gram).max()) or 1.0
    g, t = gram / scale, target / scale
    k = len(t)
    result = minimize(
        lambda w: w @ g @ w - 2 * t @ w,
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * g @ w - 2 * t,
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        method="SLSQP",
    )
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def calibrate_head_maps(
    stats: AttentionStatistics, plan: SharingPlan, mode: str, layer_kinds=None, extra_source_layers: int = EXTRA_SOURCE_LAYERS
) -> dict[int, HeadMap]:
    """Head maps for every shared layer of ``plan`` under ``mode``; ``extra_source_layers``:
    how many layers besides the anchors mix-few reads."""
    if mode == "calibrated":
        mode = CALIBRATED_DEFAULT
    if mode not in HEAD_MAP_MODES + EXPERIMENTAL_MODES:
        raise UsageError(f"unknown head map mode {mode!r}; choose one of {', '.join(HEAD_MAP_MODES)}")
    if mode in FITTED_MODES:
        raise UsageError(f"--head-map {mode} is fitted through the model (convert and eval); here choose a mode fitted from the statistics")
    if mode == "identity":
        return {}
    allowed = None  # every earlier unshared layer of the shared layer's kind
    if mode == "mix-few":
        allowed = set(plan.anchors.values()) | set(_most_used_layers(calibrate_head_maps(stats, plan, "mix", layer_kinds), plan, extra_source_layers))
        mode = "mix"
    heads = stats.num_heads
    maps: dict[int, HeadMap] = {}
    for layer, anchor in sorted(plan.anchors.items()):
        if mode in ("argmax", "argmax-group", "mix-anchor"):
            candidates = [anchor]
        else:
            candidates = [
                l for l in range(layer)
                if l not in plan.whole_layers and (layer_kinds is None or layer_kinds[l] == layer_kinds[layer]) and (allowed is None or l in allowed)
            ]
        pairs = [(l, g) for l in candidates for g in range(heads) if g not in (plan.borrowed_heads(l) or ())]  # a partly shared layer's kept heads
        sources, weights = [], []
        for head in range(heads):
            allowed_pairs = pairs
            if mode == "argmax-group":
                allowed_pairs = [(l, g) for l, g in pairs if g // stats.group_size == head // stats.group_size]
            head_sources, head_weights = head_sources_from(stats, (layer, head), allowed_pairs, mode)
            sources.append(head_sources)
            weights.append(head_weights)
        maps[layer] = HeadMap(tuple(sources), tuple(weights))
    return maps


def head_sources_from(stats: AttentionStatistics, head: tuple[int, int], pairs: list[tuple[int, int]], mode: str):
    """The sources and weights of one shared (layer, head) among candidate (layer, head) ``pairs``:
    the most similar map (an argmax mode), or the least-squares convex mixture of the TOP_K most similar (a mix mode)."""
    target = stats.index(*head)
    columns = [stats.index(l, g) for l, g in pairs]
    similarity = stats.cosine[target, columns]
    if mode.startswith("argmax"):
        return (pairs[int(np.argmax(similarity))],), (1.0,)
    top = np.argsort(-similarity)[:TOP_K]
    chosen = [columns[i] for i in top]
    w = _simplex_least_squares(stats.gram[np.ix_(chosen, chosen)], stats.gram[target, chosen])
    return tuple(pairs[i] for i in top), tuple(float(x) for x in w)


def _most_used_layers(maps: dict[int, HeadMap], plan: SharingPlan, count: int) -> list[int]:
    """The ``count`` non-anchor layers carrying the most mixture weight in ``maps``."""
    mass: Counter = Counter()
    for head_map in maps.values():
        for sources, weights in zip(head_map.sources, head_map.weights):
            for (layer, _), weight in zip(sources, weights):
                mass[layer] += weight
    anchors = set(plan.anchors.values())
    return [layer for layer, _ in mass.most_common() if layer not in anchors][:count]

"""Parity of a converted model against the PyTorch SA reference.

Three things are checked, on the same inputs for both sides:
  (a) prefill logits and cache outputs, for single prompts and a left-padded batch of 2;
  (b) incremental decoding, feeding presents back as pasts in the manifest's layout;
  (c) greedy next-token agreement at every decode step.
Decoding is teacher-forced with the reference's greedy tokens, so a single early
mismatch does not hide or multiply later ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sa_export.accuracy.compare import FP32_TOLERANCE, OutputComparison, ParityReport, Tolerance, greedy_flips
from sa_export.accuracy.reference import shared_attention
from sa_export.core.manifest import LayerCache
from sa_export.core.plan import SharingPlan
from sa_export.export import GROUP_QUERY_ATTENTION, exporter_of_manifest
from sa_export.runtime import SAModel, position_ids_from_mask

PROMPTS = (
    "The capital of France is",
    "Shared attention lets a layer reuse the attention of an earlier layer, which",
    "def fibonacci(n):",
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    input_ids: np.ndarray  # [batch, seq], left-padded
    attention_mask: np.ndarray


def parity_cases(tokenizer, vocab_size: int, seed: int = 0) -> list[Case]:
    """Single prompts and a left-padded batch of two; random ids when there is no tokenizer."""
    if tokenizer is not None:
        sequences = [tokenizer(p)["input_ids"] for p in PROMPTS]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    else:
        rng = np.random.default_rng(seed)
        sequences = [rng.integers(0, vocab_size, size=n).tolist() for n in (7, 19, 12)]
        pad = 0
    cases = [Case(f"prompt{i}", np.asarray([s]), np.ones((1, len(s)), np.int64)) for i, s in enumerate(sequences[:2])]
    batch = [sequences[2], sequences[1]]
    width = max(len(s) for s in batch)
    ids = np.full((2, width), pad, np.int64)
    mask = np.zeros((2, width), np.int64)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    cases.append(Case("batch2_left_padded", ids, mask))
    return cases


class _Reference:
    """The HF model under the SA plan, stepping with its own cache."""

    def __init__(self, model, plan: SharingPlan, position_ids: bool):
        self.model = model
        self.plan = plan
        # Graphs without a position_ids input (Gemma exports) count positions from the
        # cache length, as Hugging Face does when it is given none.
        self.position_ids = position_ids

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache):
        positions = position_ids_from_mask(attention_mask, input_ids.shape[1]) if self.position_ids else None
        with shared_attention(self.model, self.plan):
            out = self.model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(positions) if positions is not None else None,
                past_key_values=cache,
                use_cache=True,
            )
        return out.logits.float().numpy(), out.past_key_values


def _cache_tensor(cache, layer: LayerCache, kind: str, plan: SharingPlan) -> np.ndarray:
    """The reference's cache of one layer, as the graph keeps it: a partly shared layer's K
    cache holds the KV groups it keeps (the reference computes every group's), and a split
    V cache (GroupQueryAttention) the kept groups' in ``value``, the borrowed in ``borrowed_value``."""
    tensor = cache.layers[layer.layer].keys if kind == "key" else cache.layers[layer.layer].values
    if kind == "key" and plan.is_partly_shared(layer.layer) or kind == "value" and layer.borrowed_value_input:
        tensor = tensor[:, list(plan.kept_groups(layer.layer))]
    elif kind == "borrowed_value":
        tensor = tensor[:, list(plan.shared_groups[layer.layer])]
    return tensor.float().numpy()


def run_parity(
    sa_model: SAModel,
    hf_model,
    plan: SharingPlan,
    tokenizer=None,
    decode_steps: int = 32,
    tolerance: Tolerance = FP32_TOLERANCE,
    progress=None,
    prefill_chunk: int | None = None,
) -> ParityReport:
    from transformers import DynamicCache

    reference = _Reference(hf_model, plan, sa_model.manifest.has_position_ids)
    comparisons: list[OutputComparison] = []
    matches = total = 0
    flips = []
    cases = parity_cases(tokenizer, hf_model.config.vocab_size)
    if exporter_of_manifest(sa_model.manifest.exporter).graph_family == GROUP_QUERY_ATTENTION:
        # GroupQueryAttention reads a row's tokens as the first seqlens_k + 1 positions
        # (right-aligned prompts are not its contract), so these graphs are checked on unpadded rows.
        cases = [case for case in cases if case.attention_mask.all()]
    for case in cases:
        cache = DynamicCache()  # full history, as the ONNX graph keeps it
        ref_logits, cache = reference.forward(case.input_ids, case.attention_mask, cache)
        empty = sa_model.empty_cache(len(case.input_ids), case.input_ids.shape[1] + decode_steps)
        ort_logits, ort_cache, outputs = sa_model.prefill(case.input_ids, case.attention_mask, empty, prefill_chunk)
        real = case.attention_mask.astype(bool)  # padded positions carry no meaning
        comparisons.append(OutputComparison.of(f"{case.name}/prefill/logits", ort_logits[real], ref_logits[real], tolerance.logits_atol, tolerance.min_cosine))
        for layer in sa_model.layout:
            for kind, name in (("key", layer.key_output), ("value", layer.value_output), ("borrowed_value", layer.borrowed_value_output)):
                if name is not None:
                    # Cache entries at padded positions are never read; compare the real ones.
                    actual = outputs[name].transpose(0, 2, 1, 3)[real]
                    expected = _cache_tensor(cache, layer, kind, plan).transpose(0, 2, 1, 3)[real]
                    comparisons.append(
                        OutputComparison.of(f"{case.name}/prefill/{name}", actual, expected, tolerance.cache_atol, tolerance.min_cosine)
                    )
        agreed, flipped = greedy_flips(f"{case.name}/prefill", ort_logits[:, -1], ref_logits[:, -1], tolerance)
        matches, total, flips = matches + agreed, total + len(case.input_ids), flips + flipped
        if case is not cases[-1]:
            continue
        # Incremental decoding on the left-padded batch, teacher-forced with the reference's tokens.
        mask = case.attention_mask
        step_ref, step_ort = [], []
        for step in range(decode_steps):
            tokens = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
            ref_logits, cache = reference.forward(tokens, mask, cache)
            ort_logits, ort_cache, _ = sa_model.forward(tokens, mask, ort_cache)
            step_ref.append(ref_logits[:, -1])
            step_ort.append(ort_logits[:, -1])
            agreed, flipped = greedy_flips(f"{case.name}/decode{step}", ort_logits[:, -1], ref_logits[:, -1], tolerance)
            matches, total, flips = matches + agreed, total + len(tokens), flips + flipped
            if progress is not None:
                progress(step + 1, decode_steps)
        if decode_steps:
            comparisons.append(
                OutputComparison.of(f"{case.name}/decode/logits", np.stack(step_ort), np.stack(step_ref), tolerance.logits_atol, tolerance.min_cosine)
            )
    return ParityReport(
        backend="onnxruntime-cpu",
        tolerance=tolerance,
        comparisons=tuple(comparisons),
        greedy_matches=matches,
        greedy_total=total,
        decode_steps=decode_steps,
        cases=tuple(c.name for c in cases),
        flips=tuple(flips),
    )

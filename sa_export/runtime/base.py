"""What every runtime backend shares, driven only by the manifest.

On-device apps have no PyTorch: the runtime package imports numpy, onnxruntime and
tokenizers only (a test checks that torch and transformers stay unimported).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sa_export.core.errors import UsageError
from sa_export.core.manifest import LayerCache, Manifest
from sa_export.runtime.memory import release_free_memory

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}  # manifest dtype names
# Prompt tokens per forward call. Bounds what a prefill materializes per layer:
# probabilities of [batch, heads, chunk, context] instead of [batch, heads, prompt, prompt].
DEFAULT_PREFILL_CHUNK = 512


def position_ids_from_mask(attention_mask: np.ndarray, query_length: int) -> np.ndarray:
    """Positions of the last ``query_length`` tokens, counting only unpadded ones (as HF generate does)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -query_length:].astype(np.int64)


class ManifestModel:
    """What every runtime backend shares: the manifest, its cache layout, the feeds of a
    step and the hand-over of presents as the next step's pasts."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.manifest = Manifest.read(self.out_dir)
        self.manifest.require_artifacts(self.out_dir)  # a missing model file is bad input, not a runtime error
        self.layout: tuple[LayerCache, ...] = self.manifest.layout
        cache = self.cache_info = self.manifest.cache
        self.cache_dtype = NUMPY_DTYPES[cache.dtype]
        self.head_dim = cache.head_dim

        # "shared": each present is its past's buffer of max_length positions, written in place.
        self.shared_buffer = cache.buffer == "shared"
        self.max_length = cache.max_length

    def empty_cache(self, batch: int, capacity: int | None = None) -> dict[str, np.ndarray]:
        """The cache before the first step. A shared-buffer model gets buffers of ``capacity``
        positions (prompt plus new tokens; default the model's max_length), others empty ones."""
        if self.shared_buffer:
            capacity = capacity or self.max_length
            if self.max_length and capacity > self.max_length:
                raise UsageError(f"{capacity} positions exceed the model's max_length {self.max_length}")
        length = capacity if self.shared_buffer else 0
        return {
            past: np.zeros((batch, self.cache_info.kv_heads_of(past), length, self.head_dim), self.cache_dtype)
            for layer in self.layout for past, _ in layer.pairs()
        }

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **cache}
        if self.manifest.has_position_ids:
            feeds["position_ids"] = position_ids_from_mask(attention_mask, input_ids.shape[1])
        return feeds

    def next_cache(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {past: outputs[present] for layer in self.layout for past, present in layer.pairs()}

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray], chunk: int | None = DEFAULT_PREFILL_CHUNK,
        all_logits: bool = True,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Feed the new tokens in chunks of at most ``chunk`` (None: one call); the logits of
        every new token (``all_logits``) or of the last one only, the cache after the last
        chunk and that chunk's outputs.

        Generation needs only the last token's logits; keeping every chunk's would hold
        [batch, prompt, vocab] (1.5 GiB for 8,000 tokens of a 49k vocabulary)."""
        length = input_ids.shape[1]
        past = attention_mask.shape[1] - length
        if chunk is None or chunk >= length:
            logits, cache, outputs = self.forward(input_ids, attention_mask, cache)
            return (logits if all_logits else logits[:, -1:].copy()), cache, outputs
        logits = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            step_logits = outputs = None  # the last chunk's logits, unless kept, go before this chunk runs
            step_logits, cache, outputs = self.forward(input_ids[:, start:end], attention_mask[:, : past + end], cache)
            logits = [*logits, step_logits] if all_logits else [step_logits[:, -1:].copy()]
            # What the chunk freed goes back before the next one grows: each chunk's peak is
            # then what it holds, not also what glibc kept of the last (whose placement
            # varies from process to process).
            release_free_memory()
        return np.concatenate(logits, axis=1), cache, outputs

"""Per-architecture facts and the normalized shape of a decoder LM.

Architecture facts follow optimum's normalized config idea: a few declared lines per
model type, mapped onto one vocabulary. Reads config attributes only: no transformers import.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    # What the Hugging Face class calls layers whose attention kind differs.
    sliding_window_attr: str | None = None


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama"),
    "mistral": ArchitectureSpec("mistral", sliding_window_attr="sliding_window"),
    "qwen2": ArchitectureSpec("qwen2", sliding_window_attr="sliding_window"),
    "qwen3": ArchitectureSpec("qwen3", sliding_window_attr="sliding_window"),
    "phi3": ArchitectureSpec("phi3", sliding_window_attr="sliding_window"),
    "gemma2": ArchitectureSpec("gemma2", sliding_window_attr="sliding_window"),
    # Gemma 3 text: q/k RMSNorm, query_pre_attn_scalar, sliding and full layers with their own RoPE bases.
    "gemma3_text": ArchitectureSpec("gemma3_text", sliding_window_attr="sliding_window"),
    "gpt2": ArchitectureSpec("gpt2"),
    "gpt_neox": ArchitectureSpec("gpt_neox"),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The normalized shape facts of a decoder LM, read from its config."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layer_kinds: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> ModelShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * layers
        return cls(config.model_type, layers, heads, kv_heads, head_dim, config.hidden_size, tuple(kinds))

    @property
    def head_groups(self) -> dict[str, int]:
        """How the query heads fall into KV groups, as ``build_plan`` takes them (``**shape.head_groups``)."""
        return {"kv_heads": self.num_kv_heads, "num_heads": self.num_heads}

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int = 4) -> int:
        """Bytes of one token's K (or V) cache in one layer."""
        return self.num_kv_heads * self.head_dim * dtype_bytes


# Architectures whose layers already share KV caches; SA on top of that is not defined.
NATIVE_KV_SHARING = {
    "gemma3n_text": "num_kv_shared_layers",
    "gemma3n": "num_kv_shared_layers",
}

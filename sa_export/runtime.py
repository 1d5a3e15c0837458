"""Run an SA model with ONNX Runtime, driven only by its manifest and tokenizer.

On-device apps have no PyTorch: this module imports numpy, onnxruntime and
tokenizers only (a test checks that torch and transformers stay unimported).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sa_export.errors import EnvironmentProblem, UsageError
from sa_export.manifest import LayerCache, cache_layout, read_manifest

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


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
        self.manifest = read_manifest(self.out_dir)
        self.layout: list[LayerCache] = cache_layout(self.manifest)
        cache = self.manifest["cache"]
        self.cache_dtype = _NUMPY_DTYPES[cache["dtype"]]
        self.num_kv_heads = cache["num_kv_heads"]
        self.head_dim = cache["head_dim"]

        # "shared": each present is its past's buffer of max_length positions, written in place.
        self.shared_buffer = cache.get("buffer") == "shared"
        self.max_length = cache.get("max_length")

    def empty_cache(self, batch: int, capacity: int | None = None) -> dict[str, np.ndarray]:
        """The cache before the first step. A shared-buffer model gets buffers of ``capacity``
        positions (prompt plus new tokens; default the model's max_length), others empty ones."""
        if self.shared_buffer:
            capacity = capacity or self.max_length
            if self.max_length and capacity > self.max_length:
                raise UsageError(f"{capacity} positions exceed the model's max_length {self.max_length}")
        length = capacity if self.shared_buffer else 0
        shape = (batch, self.num_kv_heads, length, self.head_dim)
        return {past: np.zeros(shape, self.cache_dtype) for layer in self.layout for past, _ in layer.pairs()}

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **cache}
        if "position_ids" in self.manifest["io"]:
            feeds["position_ids"] = position_ids_from_mask(attention_mask, input_ids.shape[1])
        return feeds

    def next_cache(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {past: outputs[present] for layer in self.layout for past, present in layer.pairs()}


class SAModel(ManifestModel):
    """An ONNX Runtime session over an OUT directory, with the manifest's cache layout."""

    def __init__(self, out_dir: str | Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        super().__init__(out_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if not spin:
            # Idle pool threads otherwise spin for a while after each run; two sessions in
            # one process (bench) would then take each other's cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.out_dir / self.manifest["model_file"]), options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_pairs = [pair for layer in self.layout for pair in layer.pairs()]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One step: returns logits, the next cache (presents fed back as pasts) and all outputs."""
        if self.shared_buffer:
            return self._forward_in_place(input_ids, attention_mask, cache)
        results = dict(zip(self.output_names, self.session.run(None, self.feeds(input_ids, attention_mask, cache))))
        return results["logits"], self.next_cache(results), results

    def _forward_in_place(self, input_ids, attention_mask, cache):
        """Bind each present to its past's buffer (IOBinding), so the graph writes only the new rows."""
        import onnxruntime as ort

        total = attention_mask.shape[1]
        capacity = next(iter(cache.values())).shape[2] if cache else total
        if total > capacity:
            raise UsageError(f"the cache holds {capacity} positions; this step needs {total}")
        binding = self.session.io_binding()
        # OrtValues over the feeds, held until the run ends (a binding does not own numpy memory).
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in self.feeds(input_ids, attention_mask, {}).items()}
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # first: get_outputs() follows the order of binding
        for past, present in self.cache_pairs:
            if not cache[past].flags.c_contiguous:  # an OrtValue over it would be a copy, and the writes lost
                raise UsageError(f"cache buffer {past} must be C-contiguous (use empty_cache)")
            buffer = ort.OrtValue.ortvalue_from_numpy(cache[past])  # shares the numpy memory on CPU
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        # Presents as the reference keeps them: the filled part of each buffer (views, no copy).
        results = {"logits": logits, **{present: cache[past][:, :, :total] for past, present in self.cache_pairs}}
        return logits, cache, results

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Iterator[str]:
        return generate_text(self, load_tokenizer(self.out_dir), prompt, max_new_tokens)


def open_model(out_dir: str | Path, backend: str = "ort"):
    """The ONNX Runtime model, or the TensorRT engine (same interface) for backend "trt"."""
    if backend == "trt":
        from targets.tensorrt_backend import TRTModel

        return TRTModel(out_dir)
    return SAModel(out_dir)


def load_tokenizer(out_dir: str | Path):
    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{out_dir} has no tokenizer.json (the source model had no tokenizer); generate needs one")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EnvironmentProblem("generate needs the tokenizers package: pip install tokenizers") from None
    return Tokenizer.from_file(str(path))


def chat_prompt(out_dir: str | Path, user_message: str) -> str:
    """The model's own chat template applied to one user turn (instruct models expect it).

    Rendered with jinja2's sandbox, as transformers does, so that no PyTorch is needed.
    """
    import json

    out_dir = Path(out_dir)
    template_file = out_dir / "chat_template.jinja"
    config_file = out_dir / "tokenizer_config.json"
    template = template_file.read_text() if template_file.is_file() else None
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = template or config.get("chat_template")
    if not template:
        raise UsageError(f"{out_dir} has no chat template; drop --chat to use the prompt as plain text")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EnvironmentProblem("--chat needs jinja2: pip install jinja2") from None
    special = {k: (v if isinstance(v, str) else (v or {}).get("content")) for k, v in config.items() if k in ("bos_token", "eos_token")}
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True, **special
    )


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> Iterator[str]:
    """Greedy generation with any model that has empty_cache/forward; yields text as it decodes cleanly."""
    prompt_ids = tokenizer.encode(prompt).ids
    eos = set(model.manifest.get("eos_token_ids") or [])
    input_ids = np.asarray([prompt_ids], dtype=np.int64)
    mask = np.ones_like(input_ids)
    cache = model.empty_cache(1, len(prompt_ids) + max_new_tokens)
    generated: list[int] = []
    # Decode prompt + generated together: word-boundary spaces live in different
    # places for different tokenizers, and only the whole sequence decodes them right.
    emitted = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    for _ in range(max_new_tokens):
        logits, cache, _ = model.forward(input_ids, mask, cache)
        token = int(np.argmax(logits[0, -1]))
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(emitted) :]
            emitted = text
        input_ids = np.asarray([[token]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)

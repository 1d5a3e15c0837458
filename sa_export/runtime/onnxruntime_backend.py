"""The ONNX Runtime backend: a session over an OUT directory, with the manifest's cache layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sa_export.core.errors import UsageError
from sa_export.runtime.base import ManifestModel

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SAModel(ManifestModel):
    """An ONNX Runtime session over an OUT directory, with the manifest's cache layout."""

    def __init__(self, out_dir: str | Path, threads: int | None = None, spin: bool = True, memory: str = "arena", graph: bytes | None = None):
        """``memory``: one of ``runtime.memory.MEMORY_MODES``; ``graph``: a variant of OUT's model
        (serialized, weights still in OUT's external data) to run instead."""
        import onnxruntime as ort

        from sa_export.runtime.memory import release_free_memory, use_memory_mode

        super().__init__(out_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = use_memory_mode(memory)
        if not spin:
            # Idle pool threads otherwise spin for a while after each run; the two models
            # `bench` times side by side (a process each) would then take each other's cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if graph is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.out_dir))
        self.session = ort.InferenceSession(
            graph if graph is not None else str(self.out_dir / self.manifest.model_file), options, providers=["CPUExecutionProvider"]
        )
        release_free_memory()  # what loading freed (the parsed model): one process keeps it, another not
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        (logits,) = [o for o in outputs if o.name == "logits"]
        vocab, dtype = logits.shape[-1], _ORT_TYPES.get(logits.type)
        self.logits_layout = (vocab, dtype) if isinstance(vocab, int) and dtype else None
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
        if self.logits_layout:
            # Written straight into an array of ours: an output of ONNX Runtime's would sit in
            # its arena until the next run and be copied out ([batch, chunk, vocab] each: 100 MB
            # for a 512-token chunk of a 49k vocabulary).
            vocab, dtype = self.logits_layout
            logits = np.empty((*input_ids.shape, vocab), dtype)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            binding.bind_output("logits")  # first: get_outputs() follows the order of binding
        for past, present in self.cache_pairs:
            if not cache[past].flags.c_contiguous:  # an OrtValue over it would be a copy, and the writes lost
                raise UsageError(f"cache buffer {past} must be C-contiguous (use empty_cache)")
            buffer = ort.OrtValue.ortvalue_from_numpy(cache[past])  # shares the numpy memory on CPU
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding)
        if not self.logits_layout:
            logits = binding.get_outputs()[0].numpy()
        # Presents as the reference keeps them: the filled part of each buffer (views, no copy).
        results = {"logits": logits, **{present: cache[past][:, :, :total] for past, present in self.cache_pairs}}
        return logits, cache, results

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Iterator[str]:
        from sa_export.runtime.text import generate_text, load_tokenizer

        return generate_text(self, load_tokenizer(self.out_dir), prompt, max_new_tokens)

"""Run an OUT directory: one base over the manifest, with ONNX Runtime and TensorRT backends as siblings."""

from __future__ import annotations

from pathlib import Path

from sa_export.runtime.base import ManifestModel, position_ids_from_mask
from sa_export.runtime.onnxruntime_backend import SAModel
from sa_export.runtime.text import chat_prompt, generate_text, load_tokenizer, stream_generation

BACKENDS = ("ort", "trt")


def open_model(out_dir: str | Path, backend: str = "ort", memory: str = "arena") -> ManifestModel:
    """The ONNX Runtime model, or the TensorRT engine (same interface) for backend "trt";
    ``memory``: ONNX Runtime's memory mode (``runtime.memory.MEMORY_MODES``)."""
    if backend == "trt":
        from sa_export.runtime.tensorrt_backend import TRTModel

        return TRTModel(out_dir)
    return SAModel(out_dir, memory=memory)


__all__ = ["BACKENDS", "ManifestModel", "SAModel", "chat_prompt", "generate_text", "load_tokenizer", "open_model", "position_ids_from_mask", "stream_generation"]

"""Run onnxruntime-genai's model builder under the transformers this project pins.

The builder (onnxruntime-genai 0.18.0) is written against transformers 5, while the
optimum exporter pins transformers 4.57. For the decoder-only text models sa-export
converts, the builder needs only two adaptations, made here and nowhere else:

* it imports multimodal classes that transformers 4.57 lacks, only to list them in a
  table of loader classes; placeholders stand in for the missing names (a text model
  never reaches them);
* it reads RoPE settings from ``config.rope_parameters`` (transformers 5); 4.57 has
  ``rope_scaling``, which the builder iterates, and is None for plain RoPE.

Run as ``python -m sa_export.genai_builder BUILDER_ARGS...`` in its own process: the
builder puts its own folder on sys.path and prints as it goes.
"""

from __future__ import annotations

import runpy
import sys

# Classes the builder imports from transformers only for its loader table.
BUILDER_IMPORTS = (
    "Gemma3ForConditionalGeneration",
    "Lfm2VlForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
)


def _placeholder(name: str) -> type:
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{name} needs a newer transformers than sa-export pins")

    return type(name, (), {"from_pretrained": staticmethod(refuse)})


def adapt_transformers() -> None:
    import transformers

    # dir() lists what the lazy module can import without importing it; asking for a
    # missing name through getattr would make the lazy module forget a later setattr.
    available = set(dir(transformers))
    for name in BUILDER_IMPORTS:
        if name not in available:
            setattr(transformers, name, _placeholder(name))

    load_config = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = load_config(*args, **kwargs)
        if hasattr(config, "rope_scaling") and config.rope_scaling is None and not hasattr(config, "rope_parameters"):
            del config.rope_scaling
            config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
        return config

    transformers.AutoConfig.from_pretrained = from_pretrained


def main(argv: list[str]) -> None:
    adapt_transformers()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

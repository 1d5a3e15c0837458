"""onnxruntime-genai's model builder: ONNX Runtime's fastest CPU graph.

Packed QKV, GroupQueryAttention with rotary embedding, one past/present buffer per
cache tensor written in place. No position_ids input; ONNX Runtime only. Run as
`python -m onnxruntime_genai.models.builder`, unpatched, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir

from sa_export.core.architectures import ModelShape
from sa_export.core.cache_names import is_cache_name
from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.export.base import GROUP_QUERY_ATTENTION, Exporter, ExportOptions
from sa_export.export.onnx_io import load_onnx
from sa_export.hf.models import ModelSource, load_config

# The builder's CPU precisions sa-export can check. int4 is its default int4 graph:
# MatMulNBits weights (4 bits, blocks of 32, symmetric, accuracy_level 4 = int8 activations
# inside the MatMul) and a block-quantized embedding; what ONNX Runtime users ship.
BUILDER_PRECISIONS = {"fp32": "fp32", "int4": "int4"}


def builder_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def has_tokenizer_files(hf_dir: Path) -> bool:
    """The builder writes the model's tokenizer into its output and fails without these."""
    return any((Path(hf_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def export_genai(hf_dir: Path, export_dir: Path, precision: str) -> Path:
    """Build the GroupQueryAttention graph with onnxruntime-genai's builder, in a subprocess."""
    if not builder_installed():
        raise EnvironmentProblem("--exporter genai needs onnxruntime-genai: pip install onnxruntime-genai==0.18.0")
    if precision not in BUILDER_PRECISIONS:
        raise UsageError(f"--exporter genai builds {', '.join(BUILDER_PRECISIONS)} graphs for the CPU; got --precision {precision}")
    if not has_tokenizer_files(hf_dir):
        raise UsageError(f"--exporter genai: onnxruntime-genai's builder needs the model's tokenizer files, and {hf_dir} has none")
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(export_dir), "-p", BUILDER_PRECISIONS[precision], "-e", "cpu",
        "-c", str(export_dir / "hf_cache"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (export_dir / "model.onnx").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"onnxruntime-genai's model builder failed on {hf_dir}: {tail[0]}")
    return export_dir / "model.onnx"


def _fix_cache_head_dim(graph: ir.Graph, head_dim: int) -> None:
    """The builder leaves the cache's head_dim symbolic; the manifest and runtime need the number."""
    for value in [*graph.inputs, *graph.outputs]:
        if is_cache_name(value.name) and value.shape is not None and len(value.shape) == 4:
            value.shape = ir.Shape([*value.shape[:3], head_dim])


def _has_sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True) and window < (getattr(config, "max_position_embeddings", None) or window + 1)


class GenaiExporter(Exporter):
    name = "genai"
    graph_family = GROUP_QUERY_ATTENTION
    precisions = tuple(BUILDER_PRECISIONS)
    serves_tensorrt = False
    has_position_ids = False
    # Architectures whose builder graph the GQA sharing rewrite handles (packed QKV).
    rewritable = ("llama", "qwen2")
    unsupported = {
        "gemma3_text": "onnxruntime-genai 0.18's builder fails on Gemma 3 under transformers 5 (it reads one rope_type, "
        "and transformers 5 keeps one RoPE setting per layer type: KeyError 'rope_type'); use the default exporter",
    }

    def describe(self, options: ExportOptions) -> str:
        return f"onnxruntime-genai's model builder ({options.precision}, GroupQueryAttention, shared past/present buffer)"

    def refuse(self, config, target, source_kind: str) -> None:
        super().refuse(config, target, source_kind)
        if config is not None and _has_sliding_window(config):
            raise UsageError(
                f"--exporter genai: onnxruntime-genai's graph for {config.model_type} attends to the whole context, "
                f"not the model's sliding window of {config.sliding_window}; use the default exporter"
            )
        if target.uses_tensorrt or source_kind != "hf":
            raise UsageError(
                "--exporter genai builds an ONNX Runtime graph (com.microsoft GroupQueryAttention) from a Hugging Face model: "
                "use it with --target cpu; TensorRT targets take the default exporter"
            )

    def export(self, source: ModelSource, options: ExportOptions, export_dir: Path, eager_fp32_model=None) -> ir.Model:
        model = load_onnx(export_genai(source.path, export_dir, options.precision))
        _fix_cache_head_dim(model.graph, ModelShape.from_config(load_config(source, options.accept_unknown_config_keys)).head_dim)
        return model

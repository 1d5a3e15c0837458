"""Export a Hugging Face decoder LM to ONNX with past key values.

Two exporters:
  dynamo   torch.onnx.export(dynamo=True), at opset 18 or 23, the default: decomposed
           attention for every target (input_ids, attention_mask, position_ids,
           past_key_values.N.key/value -> logits, present.N.key/value). With SDPA
           attention at opset 23 it emits the standard ONNX Attention op, which the
           passes unfuse.
  genai    onnxruntime-genai's model builder: ONNX Runtime's fastest CPU graph (packed
           QKV, GroupQueryAttention with rotary, one past/present buffer per cache
           tensor). No position_ids input; ONNX Runtime only.

optimum-onnx's TorchScript exporter was the default until transformers 5: its newest
release (0.1.0) requires transformers<4.58, so it cannot run beside the transformers
that saves today's checkpoints (README "Exporters").
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from sa_export.errors import EnvironmentProblem, UsageError

EXPORTERS = ("dynamo", "genai")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = 18
REMOVED_EXPORTERS = {
    "optimum": "optimum-onnx (newest release 0.1.0) requires transformers<4.58 and cannot read checkpoints saved by "
    "transformers 5; use the default --exporter dynamo (the same decomposed graph family)",
}
GENAI_PRECISIONS = {"fp32": "fp32"}  # the builder's CPU precisions sa-export can check
# Architectures the builder (0.18.0) cannot build under the pinned transformers, and why (measured).
GENAI_UNSUPPORTED = {
    "gemma3_text": "onnxruntime-genai 0.18's builder fails on Gemma 3 under transformers 5 (it reads one rope_type, "
    "and transformers 5 keeps one RoPE setting per layer type: KeyError 'rope_type'); use the default exporter",
}


class _FlatCacheModel(torch.nn.Module):
    """The model with the cache as flat tensors, the form torch.export and ONNX want."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_dynamo(model, export_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """torch.onnx's dynamo exporter with dynamic batch, sequence and past lengths."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise UsageError("--exporter dynamo needs onnxscript: pip install onnxscript") from None
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq + past_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None].expand(batch, -1)
    dtype = next(model.parameters()).dtype
    past = [torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers)]
    cache_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dim = torch.export.Dim
    b, s, p, t = dim("batch_size", max=1024), dim("sequence_length", max=65536), dim("past_sequence_length", max=131072), dim("total_sequence_length", max=196608)
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * layers)),
    }
    export_dir.mkdir(parents=True, exist_ok=True)
    path = export_dir / "model.onnx"
    torch.onnx.export(
        _FlatCacheModel(model).eval(),
        (ids, mask, positions, *past),
        str(path),
        input_names=["input_ids", "attention_mask", "position_ids", *cache_names],
        output_names=["logits", *present_names],
        dynamic_shapes=dynamic,
        dynamo=True,
        opset_version=opset,
        verbose=False,  # sa-export prints its own progress line
        external_data=True,
    )
    return path


def attention_for_export(exporter: str, opset: int | None) -> str:
    """Eager attention gives decomposed MatMul/Softmax/MatMul; dynamo at opset 23 takes
    SDPA and emits the ONNX Attention op (which the passes unfuse)."""
    return "sdpa" if exporter == "dynamo" and (opset or DEFAULT_OPSET) >= 23 else "eager"


def export_genai(hf_dir: Path, export_dir: Path, precision: str) -> Path:
    """Build the GroupQueryAttention graph with onnxruntime-genai's builder, in a subprocess."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise EnvironmentProblem("--exporter genai needs onnxruntime-genai: pip install onnxruntime-genai==0.18.0")
    if precision not in GENAI_PRECISIONS:
        raise UsageError(f"--exporter genai builds {', '.join(GENAI_PRECISIONS)} graphs for the CPU; got --precision {precision}")
    if not any((Path(hf_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UsageError(f"--exporter genai: onnxruntime-genai's builder needs the model's tokenizer files, and {hf_dir} has none")
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(export_dir), "-p", GENAI_PRECISIONS[precision], "-e", "cpu",
        "-c", str(export_dir / "hf_cache"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (export_dir / "model.onnx").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"onnxruntime-genai's model builder failed on {hf_dir}: {tail[0]}")
    return export_dir / "model.onnx"


def refuse_unknown_exporter(exporter: str) -> None:
    if exporter in REMOVED_EXPORTERS:
        raise UsageError(f"--exporter {exporter} was removed: {REMOVED_EXPORTERS[exporter]}")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")


def export_model(model, export_dir: Path, exporter: str = DEFAULT_EXPORTER, opset: int | None = None) -> Path:
    refuse_unknown_exporter(exporter)
    if exporter == "dynamo":
        return export_dynamo(model, export_dir, opset or DEFAULT_OPSET)
    raise UsageError(f"--exporter {exporter} builds from the model directory, not a loaded model")

"""torch.onnx's dynamo exporter: decomposed attention for every target.

At opset 18 eager attention exports as MatMul/Softmax/MatMul; at opset 23 SDPA exports
as the standard ONNX Attention op, which the passes unfuse. Inputs: input_ids,
attention_mask, position_ids, past_key_values.N.key/value; outputs: logits,
present.N.key/value.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch

from sa_export.core.architectures import ModelShape
from sa_export.core.cache_names import past_name, present_name
from sa_export.core.errors import UsageError
from sa_export.export.base import DECOMPOSED, Exporter, ExportOptions
from sa_export.export.onnx_io import load_onnx
from sa_export.hf.models import ModelSource, load_hf_model

DEFAULT_OPSET = 18


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
    shape = ModelShape.from_config(model.config)
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq + past_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None].expand(batch, -1)
    dtype = next(model.parameters()).dtype
    past = [torch.randn(batch, shape.num_kv_heads, past_len, shape.head_dim, dtype=dtype) for _ in range(2 * shape.num_layers)]
    kinds = [(layer, kind) for layer in range(shape.num_layers) for kind in ("key", "value")]
    dim = torch.export.Dim
    b, s, p, t = dim("batch_size", max=1024), dim("sequence_length", max=65536), dim("past_sequence_length", max=131072), dim("total_sequence_length", max=196608)
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in kinds),
    }
    export_dir.mkdir(parents=True, exist_ok=True)
    path = export_dir / "model.onnx"
    torch.onnx.export(
        _FlatCacheModel(model).eval(),
        (ids, mask, positions, *past),
        str(path),
        input_names=["input_ids", "attention_mask", "position_ids", *(past_name(layer, kind) for layer, kind in kinds)],
        output_names=["logits", *(present_name(layer, kind) for layer, kind in kinds)],
        dynamic_shapes=dynamic,
        dynamo=True,
        opset_version=opset,
        verbose=False,  # sa-export prints its own progress line
        external_data=True,
    )
    return path


class DynamoExporter(Exporter):
    name = "dynamo"
    graph_family = DECOMPOSED
    precisions = ("fp32", "fp16")
    serves_tensorrt = True
    has_position_ids = True

    def default_opset(self) -> int:
        return DEFAULT_OPSET

    def resolve_opset(self, opset: int | None) -> int:
        return opset or DEFAULT_OPSET

    @staticmethod
    def attention(opset: int) -> str:
        """Eager attention gives decomposed MatMul/Softmax/MatMul; at opset 23 SDPA gives the ONNX Attention op."""
        return "sdpa" if opset >= 23 else "eager"

    def describe(self, options: ExportOptions) -> str:
        return f"torch.onnx dynamo ({options.precision}, opset {self.resolve_opset(options.opset)})"

    def export(self, source: ModelSource, options: ExportOptions, export_dir: Path, eager_fp32_model=None) -> ir.Model:
        opset = self.resolve_opset(options.opset)
        attention = self.attention(opset)
        if eager_fp32_model is not None and options.precision == "fp32" and attention == "eager":
            model = eager_fp32_model
        else:
            model = load_hf_model(source, options.allow_pickle, half=options.precision == "fp16", attention=attention)
        return load_onnx(export_dynamo(model, export_dir, opset))

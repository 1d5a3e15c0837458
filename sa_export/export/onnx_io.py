"""Loading and saving ONNX models safely, with external data where the size needs it."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from graph_passes.apply import initializer_bytes
from graph_passes.attention_blocks import cache_layers
from sa_export.core.errors import UsageError

# Protobuf cannot serialize a message of 2 GiB or more; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1 << 30
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def check_external_data_paths(model: ir.Model, model_dir: Path) -> None:
    """Refuse external-data locations that escape the model's directory (path traversal)."""
    root = model_dir.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            target = (root / tensor.location).resolve()
            if not target.is_relative_to(root):
                raise UsageError(
                    f"initializer {value.name!r} points at external data {tensor.location!r} outside {root}; refusing to read it"
                )
            if not target.is_file():
                raise UsageError(f"initializer {value.name!r} needs external data {target}, which is missing")


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX model lazily (external weights stay on disk) and validate it as an LM with a cache."""
    try:
        model = ir.load(path)
    except Exception as exc:  # onnx raises DecodeError and others; the message is what matters here
        raise UsageError(f"{path} is not a readable ONNX model: {exc}") from None
    check_external_data_paths(model, path.parent)
    names = {v.name for v in model.graph.inputs}
    if "input_ids" not in names or "logits" not in {v.name for v in model.graph.outputs}:
        raise UsageError(f"{path} is not a decoder LM graph (it needs an input_ids input and a logits output)")
    if not cache_layers(model.graph):
        raise UsageError(
            f"{path} has no past_key_values inputs; export it with past key values, "
            "or convert the Hugging Face model directory instead"
        )
    return model


def save_onnx(model: ir.Model, out_dir: Path) -> list[str]:
    """Save as model.onnx, with its weights in model.onnx.data when they are large. Returns the file names."""
    if initializer_bytes(model.graph) >= EXTERNAL_DATA_THRESHOLD:
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
        return [MODEL_FILE, DATA_FILE]
    # Small enough for one file: bring weights that an exporter put in external data inside.
    ir.external_data.load_to_model(model)
    ir.save(model, out_dir / MODEL_FILE)
    return [MODEL_FILE]

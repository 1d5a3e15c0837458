"""External data: written above the threshold, refused when it points outside the model directory."""

import onnx
import onnx_ir as ir
import pytest

from sa_export.export import onnx_io
from sa_export.core.errors import UsageError
from sa_export.stages.convert import ConvertRequest, convert


def test_large_models_are_saved_with_external_data_without_the_removed_weights(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    result = convert(ConvertRequest(model=str(tiny_llama), spans=("3-4",), out=tmp_path / "sa"))
    data = tmp_path / "sa" / "model.onnx.data"
    assert data.is_file() and result.parity.passed
    assert "model.onnx.data" in result.manifest.files
    # The data file holds the remaining weights; the removed Q/K projections are not in it.
    assert result.rewrite.weight_bytes_after - 4096 <= data.stat().st_size <= result.rewrite.weight_bytes_after + 64 * 1024
    assert data.stat().st_size < result.rewrite.weight_bytes_before


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    x = ir.val("input_ids", ir.DataType.INT64, [1, 1])
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 16)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tensor = ir.ExternalTensor("../secret.bin", 0, 16, ir.DataType.FLOAT, shape=ir.Shape([4]), name="w", base_dir=model_dir)
    w = ir.Value(name="w", const_value=tensor)
    node = ir.node("Identity", [w])
    node.outputs[0].name = "logits"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18})
    onnx.save_model(ir.serde.serialize_model(ir.Model(graph, ir_version=10)), model_dir / "model.onnx")
    with pytest.raises(UsageError, match="outside"):
        onnx_io.load_onnx(model_dir / "model.onnx")

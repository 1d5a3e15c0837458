"""The export cache: a second convert of the same model files reuses the graph, and only then."""

import os
import shutil
import time

import numpy as np
import onnx_ir as ir

from sa_export.export import get_exporter
from sa_export.export.base import Exporter, ExportOptions
from sa_export.export.cache import EXPORTS, evict_least_recent, _keep, export_graph, export_key
from sa_export.hf.models import ModelSource
from tests.helpers import run_cli


def _lm_graph(scale: float = 1.0) -> ir.Model:
    """The smallest graph load_onnx takes for an LM: input_ids, one past, logits, one weight."""
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 1]))
    past = ir.Value(name="past_key_values.0.key", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 1, 1, 2]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.full((1, 1, 1, 256), scale, np.float32)))
    node = ir.node("Mul", [past, weight], name="mul")
    node.outputs[0].name = "logits"
    graph = ir.Graph([ids, past], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


class _Counting(Exporter):
    name, graph_family, precisions, serves_tensorrt, has_position_ids = "counting", "decomposed", ("fp32",), False, False

    def __init__(self):
        self.calls = 0

    def describe(self, options):
        return "a counting exporter"

    def export(self, source, options, export_dir, eager_fp32_model=None):
        self.calls += 1
        return _written(_lm_graph(), export_dir)


def _written(model: ir.Model, directory):
    """The model as an exporter leaves it: saved with its weights in external data, loaded lazily."""
    directory.mkdir(parents=True)
    ir.save(model, directory / "model.onnx", external_data="model.onnx.data")
    return ir.load(directory / "model.onnx")


def test_the_graph_is_exported_once_then_read_back(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    exporter, source = _Counting(), ModelSource("hf", tiny_llama, "tiny")
    first = export_graph(exporter, source, ExportOptions(), tmp_path / "e1")
    again = export_graph(exporter, source, ExportOptions(), tmp_path / "e2")
    assert exporter.calls == 1 and "reusing the counting export kept" in capsys.readouterr().err
    assert again.graph.initializers["w"].const_value.numpy().tolist() == first.graph.initializers["w"].const_value.numpy().tolist()
    export_graph(exporter, source, ExportOptions(), tmp_path / "e3", use_cache=False)  # --no-export-cache
    assert exporter.calls == 2
    # An entry without its model (a store cut short) is never read: exported again and stored.
    (entry,) = (tmp_path / "cache" / EXPORTS).iterdir()
    (entry / "model.onnx").unlink()
    export_graph(exporter, source, ExportOptions(), tmp_path / "e4")
    assert exporter.calls == 3 and (entry / "model.onnx").is_file()


def test_the_key_is_the_content_of_the_files_and_what_exports_them(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    source, dynamo = ModelSource("hf", model, "model"), get_exporter("dynamo")
    key = export_key(source, dynamo, ExportOptions())
    moved = ModelSource("hf", shutil.copytree(model, tmp_path / "moved"), "moved")
    assert export_key(moved, dynamo, ExportOptions()) == key  # the path is not the model
    assert export_key(source, dynamo, ExportOptions("fp16")) != key
    assert export_key(source, dynamo, ExportOptions(opset=23)) != key
    assert export_key(source, get_exporter("genai"), ExportOptions()) != key
    assert export_key(source, dynamo, ExportOptions(opset=18)) == key  # the default opset, named
    weights = model / "model.safetensors"  # saved again in place: one byte of one weight, same size
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert export_key(source, dynamo, ExportOptions()) != key


def test_a_cache_that_cannot_keep_the_export_says_why_and_loses_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    exported = _written(_lm_graph(2.0), tmp_path / "export")
    model, why = _keep(exported, tmp_path / "export", tmp_path / "file" / EXPORTS / "key", 2**30)
    assert model is exported and why is not None and "Not a directory" in why
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "export" / "model.onnx.data").is_file()
    assert model.graph.initializers["w"].const_value.numpy().max() == 2.0  # its weights read where they were


def test_a_kept_export_is_moved_not_copied_and_read_from_the_cache(tmp_path):
    exported = _written(_lm_graph(3.0), tmp_path / "export")
    data = (tmp_path / "export" / "model.onnx.data").stat().st_ino
    model, why = _keep(exported, tmp_path / "export", tmp_path / "cache" / "key", 2**30)
    assert why is None and not (tmp_path / "export").exists()
    assert (tmp_path / "cache" / "key" / "model.onnx.data").stat().st_ino == data
    assert model.graph.initializers["w"].const_value.numpy().max() == 3.0


def test_the_least_recently_used_exports_go_first_and_recent_ones_stay(tmp_path):
    root = tmp_path / EXPORTS
    for number, age in ((1, 3600), (2, 1800), (3, 60)):
        entry = root / f"entry{number}"
        entry.mkdir(parents=True)
        (entry / "model.onnx").write_bytes(b"x" * 1000)
        os.utime(entry, (time.time() - age,) * 2)
    evict_least_recent(root, 1500)  # room for one: the oldest goes, then the next; the third is in use
    assert sorted(p.name for p in root.iterdir()) == ["entry3"]
    (root / "entry4").mkdir()
    (root / "entry4" / "model.onnx").write_bytes(b"x" * 1000)
    evict_least_recent(root, 0)  # both recent: kept, whatever the room
    assert sorted(p.name for p in root.iterdir()) == ["entry3", "entry4"]


def test_a_convert_from_the_kept_export_writes_the_graph_an_export_writes(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    common = ("--exporter", "dynamo", "--no-check")
    first = run_cli("convert", tiny_llama, "--span", "3-4", "-o", tmp_path / "a", *common)
    assert first.exit_code == 0 and "kept the export" in first.stderr, first.stderr
    reused = run_cli("convert", tiny_llama, "--span", "2-4", "-o", tmp_path / "b", *common)  # another plan, the same export
    assert reused.exit_code == 0 and "reusing the dynamo export kept" in reused.stderr and "exporting to ONNX" not in reused.stderr, reused.stderr
    assert "export reused (" in reused.output and "% of export" not in reused.output
    fresh = run_cli("convert", tiny_llama, "--span", "2-4", "-o", tmp_path / "c", "--no-export-cache", *common)
    assert fresh.exit_code == 0 and "exporting to ONNX" in fresh.stderr and "kept the export" not in fresh.stderr
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "c" / "model.onnx").read_bytes()
    assert len(list((tmp_path / "cache" / EXPORTS).iterdir())) == 1


def test_a_limit_that_is_not_a_size_is_one_line(monkeypatch):
    import pytest

    from sa_export.core.errors import UsageError
    from sa_export.export.cache import limit_bytes

    monkeypatch.setenv("SA_EXPORT_CACHE_EXPORTS_GB", "lots")
    with pytest.raises(UsageError, match="'lots' is not a size in GiB"):
        limit_bytes()
    monkeypatch.setenv("SA_EXPORT_CACHE_EXPORTS_GB", "0.5")
    assert limit_bytes() == 2**29

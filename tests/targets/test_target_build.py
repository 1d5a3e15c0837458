"""Everything before the engine build, on CPU: profiles, trtexec command, fp16 placement, memory fit, compatibility."""

import json
import shlex

import onnx
import onnx_ir as ir
import pytest
from onnx import shape_inference

from sa_export.core.manifest import Manifest
from targets.compat import check_compatibility
from targets.profiles import get_target
from targets.shapes import profiles_for
from tests.helpers import leftovers, run_cli


@pytest.fixture(scope="module")
def jetson_out(tiny_llama_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("jetson") / "sa"
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3-4", "--target", "jetson-orin", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "largest context that fits" in result.output and "device bundle" in result.output
    return out


def _trtexec_shapes(script: str) -> dict[str, dict[str, list[int]]]:
    command = script[script.index("trtexec") :].replace("\\\n", " ")
    shapes = {}
    for arg in shlex.split(command):
        for which in ("min", "opt", "max"):
            if arg.startswith(f"--{which}Shapes="):
                for item in arg.split("=", 1)[1].split(","):
                    name, dims = item.split(":")
                    shapes.setdefault(name, {})[which] = [int(d) for d in dims.split("x")]
    return shapes


def test_trtexec_command_names_exactly_the_graph_inputs_with_consistent_shapes(jetson_out):
    graph = onnx.load(jetson_out / "bundle" / "model.onnx").graph
    script = (jetson_out / "bundle" / "build_engine.sh").read_text()
    shapes = _trtexec_shapes(script)
    assert set(shapes) == {i.name for i in graph.input}
    assert "past_key_values.3.key" not in shapes and "past_key_values.3.value" in shapes
    for graph_input in graph.input:
        ranges = shapes[graph_input.name]
        dims = graph_input.type.tensor_type.shape.dim
        assert len(ranges["min"]) == len(ranges["opt"]) == len(ranges["max"]) == len(dims)
        for axis, dim in enumerate(dims):
            assert ranges["min"][axis] <= ranges["opt"][axis] <= ranges["max"][axis]
            if dim.HasField("dim_value"):
                assert ranges["min"][axis] == ranges["max"][axis] == dim.dim_value
    assert "--stronglyTyped" in script and "--memPoolSize=workspace:1024" in script
    assert "--saveEngine=model.engine" in script and "--timingCacheFile=timing.cache" in script
    assert shapes["attention_mask"]["max"] == [1, 4096]  # the Orin Nano profile: batch 1, 4096 tokens


def test_fp16_model_runs_scores_and_softmax_in_fp32(jetson_out):
    model = shape_inference.infer_shapes(onnx.load(jetson_out / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 4
    for node in softmaxes:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT and types[node.output[0]] == onnx.TensorProto.FLOAT
    for node in model.graph.node:
        if node.op_type == "ReduceMean":  # RMSNorm statistics
            assert types[node.input[0]] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.value"] == onnx.TensorProto.FLOAT16
    manifest = json.loads((jetson_out / "sa_manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["io"]["present.0.value"] == "float16"
    assert manifest["parity"]["passed"] and manifest["parity"]["tolerance"] == "fp16"


def test_memory_fit_reports_both_models_with_what_sa_adds(jetson_out):
    manifest = json.loads((jetson_out / "sa_manifest.json").read_text())
    memory, savings = manifest["target_build"]["memory"], manifest["cache"]["savings"]
    # One anchor (2) holds its fp16 probabilities [1, 4 heads, 512, 512] while layers 3-4 read them.
    assert memory["sa_probability_bytes"] == 1 * 4 * 512 * 512 * 2
    kv_saved = memory["batch"] * memory["context"] * savings["bytes_per_token_saved"]
    assert memory["total_bytes_sa"] == memory["total_bytes_base"] - kv_saved + memory["sa_probability_bytes"]
    assert memory["max_context_base"] > 0 and memory["max_context_sa"] > 0


def test_live_probability_tensors_count_anchors_held_at_once():
    from sa_export.core.plan import build_plan
    from targets.memory import live_probability_tensors

    assert live_probability_tensors(build_plan(["3-4"], 6)) == 1
    assert live_probability_tensors(build_plan(["2-3", "5-6"], 8)) == 1  # anchor 1 is done before anchor 4 starts
    assert live_probability_tensors(build_plan(["3-4", "6-7"], 8, (2, 1))) == 2  # anchor 1 is held across anchor 2's span


def test_a_context_that_does_not_fit_exits_1(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli(
        "convert", tiny_llama_with_tokenizer, "--span", "3", "--target", "jetson-orin", "--max-batch", "64",
        "--max-context", "200000000", "-o", tmp_path / "big", "--no-check",
    )
    assert result.exit_code == 1 and "does not fit" in result.stderr


def test_an_op_tensorrt_cannot_parse_exits_2_naming_the_node(jetson_out, tiny_llama_with_tokenizer, tmp_path):
    model = ir.load(jetson_out / "model.onnx")
    first = next(iter(model.graph))
    odd = ir.node("Unique", [first.outputs[0]], name="my_unique_node", num_outputs=1)
    model.graph.insert_after(first, odd)
    model.graph.outputs.append(odd.outputs[0])
    odd.outputs[0].name = "unique_out"
    profiles = profiles_for(Manifest.read(jetson_out), 1, 4096, 512)
    report = check_compatibility(model, get_target("jetson-orin"), profiles)
    assert not report.ok and any("my_unique_node" in p and "Unique" in p for p in report.problems)
    assert check_compatibility(ir.load(jetson_out / "model.onnx"), get_target("jetson-orin"), profiles).ok

    path = tmp_path / "odd.onnx"
    ir.save(model, path)
    result = run_cli(
        "convert", path, "--span", "3-4", "--target", "jetson-orin", "--reference", tiny_llama_with_tokenizer, "-o", tmp_path / "o", "--no-check"
    )
    assert result.exit_code == 2, result.output + result.stderr
    assert "does not fit TensorRT" in result.stderr and "my_unique_node" in result.stderr
    assert leftovers(tmp_path / "o") == []


@pytest.mark.gpu
def test_engine_build_and_tensorrt_parity(tiny_llama_with_tokenizer, tmp_path):
    out = tmp_path / "engine"
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3-4", "--target", "hopper", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert (out / "model.engine").is_file()
    check = run_cli("check", out, "--backend", "trt")
    assert check.exit_code == 0, check.output + check.stderr


def test_a_tensorrt_10_15_target_gets_in_place_caches_and_jetpack_6_the_concat_graph(jetson_out, tiny_llama_with_tokenizer, tmp_path):
    manifest = json.loads((jetson_out / "sa_manifest.json").read_text())
    assert manifest["cache"]["buffer"] == "shared" and manifest["cache"]["max_length"] == 256  # the tiny model's positions
    graph = onnx.load(jetson_out / "model.onnx").graph
    caches = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    assert not [n for n in graph.node if n.op_type == "Concat" and set(n.input) & caches]
    assert sum(n.op_type == "TensorScatter" for n in graph.node) == len(caches)
    older = tmp_path / "jp6"
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3-4", "--target", "jetson-orin-jp6", "-o", older, "--no-check")
    assert result.exit_code == 0, result.output + result.stderr
    graph = onnx.load(older / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "TensorScatter"]
    assert json.loads((older / "sa_manifest.json").read_text())["cache"]["buffer"] == "concat"

"""The SA rewrite of GroupQueryAttention graphs (onnxruntime-genai's builder)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graph_passes.sequences import run_sequence
from graph_passes.share_gqa import QK_OUTPUT_SOFTMAX, ShareGqaPass, find_gqa_layers
from sa_export.core.errors import PlanError
from sa_export.core.manifest import Manifest
from sa_export.export.onnx_io import load_onnx
from sa_export.core.plan import build_plan


def _nodes_by_op(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _branches(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of the graph or of its branches reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for branch in _branches(node).values():
            names |= _reads(branch) | {o.name for o in branch.output}
    return names


def test_shared_layers_lose_their_q_k_path_and_k_cache(genai_tiny_llama):
    model = onnx.load(genai_tiny_llama / "model.onnx", load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    gqa = _nodes_by_op(model, "GroupQueryAttention")
    # Layers 3-4 share layer 2's probabilities: 6 layers; the anchor's GQA is in an If.
    assert sorted(n.output[1] for n in gqa) == [f"present.{i}.key" for i in (0, 1, 5)]
    assert all(len(n.output) == 3 or not n.output[3] for n in gqa)
    for layer in (3, 4):
        assert f"past_key_values.{layer}.key" not in inputs and f"present.{layer}.key" not in outputs
        assert f"past_key_values.{layer}.value" in inputs and f"present.{layer}.value" in outputs
        assert not any(f"layers.{layer}.attn.qkv_proj" in i.name for i in model.graph.initializer)
    scatters = _nodes_by_op(model, "TensorScatter")
    assert sorted(n.output[0] for n in scatters) == ["present.3.value", "present.4.value"]
    assert [n.input[0] for n in sorted(scatters, key=lambda n: n.output[0])] == ["past_key_values.3.value", "past_key_values.4.value"]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 24


def test_anchor_keeps_probabilities_at_decode_and_shared_layers_recompute_at_prefill(genai_tiny_llama):
    """One If per anchor and shared layer: a decode step reads the stored probabilities, a
    longer step runs GQA on the anchor's queries and K cache (nothing of the probabilities'
    size crosses layers at prefill)."""
    model = onnx.load(genai_tiny_llama / "model.onnx", load_external_data=False)
    ifs = _nodes_by_op(model, "If")
    anchor = next(n for n in ifs if "present.2.key" in n.output)
    step, prefill = _branches(anchor)["then_branch"], _branches(anchor)["else_branch"]
    (with_probs,) = [n for n in step.node if n.op_type == "GroupQueryAttention"]
    (without,) = [n for n in prefill.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: a.i for a in with_probs.attribute}["qk_output"] == QK_OUTPUT_SOFTMAX and with_probs.output[3]
    assert "qk_output" not in {a.name for a in without.attribute}
    shared = [n for n in ifs if n is not anchor]
    assert len(shared) == 2
    for node in shared:
        step, prefill = _branches(node)["then_branch"], _branches(node)["else_branch"]
        assert [n.op_type for n in step.node].count("MatMul") == 1 and anchor.output[3] in _reads(step)
        (recompute,) = [n for n in prefill.node if n.op_type == "GroupQueryAttention"]
        # The anchor's K cache and the layer's V cache, cut to the rows before this step.
        past = {n.output[0]: n for n in prefill.node if n.op_type == "Slice"}
        layer = int(node.name.removeprefix("sa.layer").split(".")[0])
        assert [past[name].input[0] for name in recompute.input[3:5]] == ["present.2.key", f"past_key_values.{layer}.value"]
        assert {past[name].input[2] for name in recompute.input[3:5]} == {"sa.cache.past_end"}


def test_nothing_of_the_removed_paths_is_left(genai_tiny_llama):
    """Every node feeds another node or a graph output, and every initializer is read:
    no shape computation or weight of the removed Q/K paths lingers."""
    model = onnx.load(genai_tiny_llama / "model.onnx", load_external_data=False)
    read = _reads(model.graph) | {o.name for o in model.graph.output}
    dead = [n.name for n in model.graph.node if not any(out and out in read for out in n.output)]
    assert not dead, dead
    unread = [i.name for i in model.graph.initializer if i.name not in read]
    assert not unread, unread
    for node in model.graph.node:
        for layer in (3, 4):
            assert f"layers.{layer}/attn/qkv_proj" not in node.name and f"layers.{layer}/attn/GroupQueryAttention" not in node.name


def test_manifest_describes_the_shared_buffer_and_parity_passed(genai_tiny_llama):
    manifest = Manifest.read(genai_tiny_llama).to_json()
    assert manifest["exporter"] == "genai"
    assert manifest["cache"]["buffer"] == "shared" and manifest["cache"]["max_length"] == 256
    assert [layer["k_cache"] for layer in manifest["cache"]["layers"]] == [True, True, True, False, False, True]
    assert manifest["parity"]["passed"], manifest["parity"]


def test_plan_for_another_layer_count_is_refused(genai_tiny_llama):
    model = load_onnx(genai_tiny_llama / "model.onnx")
    with pytest.raises(PlanError, match="layers"):
        run_sequence(ShareGqaPass(build_plan(["1-2"], 8, (), None, False)), model)


def test_gqa_layers_are_found_by_their_present_names(genai_tiny_llama):
    layers = find_gqa_layers(load_onnx(genai_tiny_llama / "model.onnx").graph)
    assert sorted(layers) == [0, 1, 5]  # the anchor's (2) is inside its If
    assert {(l.num_heads, l.kv_num_heads, l.head_dim) for l in layers.values()} == {(4, 2, 16)}


def test_mixed_head_maps_and_two_anchors_keep_parity(tiny_llama_with_tokenizer, tmp_path_factory):
    """Mixtures of several source heads (Concat and one mixing MatMul over GQA probabilities), two spans."""
    out, plan = _convert_mapped(tiny_llama_with_tokenizer, tmp_path_factory, "mix-few")
    assert dict(plan.anchors) == {2: 1, 3: 1, 5: 4} and plan.head_maps
    model = onnx.load(out / "model.onnx", load_external_data=False)
    anchors = [n for n in _nodes_by_op(model, "GroupQueryAttention") if len(n.output) > 3 and n.output[3]]
    sources = {source for head_map in plan.head_maps.values() for source in head_map.layers}
    assert sorted(n.output[1] for n in anchors) == [f"present.{layer}.key" for layer in sorted(sources)]


def test_qkv_bias_is_cut_to_its_v_part(tmp_path):
    """Qwen2: the builder's packed projection has a bias Add; shared layers keep its V slice."""
    from sa_export.stages.convert import ConvertRequest, convert
    from tests.conftest import build_tiny_model

    source = build_tiny_model("qwen2", tmp_path / "qwen2", with_tokenizer=True)
    result = convert(ConvertRequest(model=str(source), spans=("2-3",), out=tmp_path / "out", exporter="genai"))
    assert result.parity.passed, result.parity.summary_line()
    model = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False)
    biases = {i.name: list(i.dims) for i in model.graph.initializer if "bias" in i.name}
    assert biases["sa.layer2.v_proj.bias"] == [32]  # 2 KV heads x 16
    assert not any(name.startswith("model.layers.2.attn.qkv_proj") for name in biases)
    # Part of a layer: the kept heads' packed bias (Q of 2 heads, K and V of 1 group) and the borrowed group's V bias.
    result = convert(ConvertRequest(model=str(source), spans=("3.0",), out=tmp_path / "part", exporter="genai"))
    assert result.parity.passed, result.parity.summary_line()
    model = onnx.load(tmp_path / "part" / "model.onnx", load_external_data=False)
    biases = {i.name: list(i.dims) for i in model.graph.initializer if "bias" in i.name}
    assert biases["sa.layer3.kept_qkv.bias"] == [64] and biases["sa.layer3.borrowed.v_proj.bias"] == [16]


@pytest.mark.parametrize(
    ("arch", "message"),
    [("mistral", "sliding window of 16"), ("qwen3", "takes separate Q, K and V")],
)
def test_graphs_the_rewrite_cannot_keep_exact_are_refused(arch, message, tmp_path):
    from tests.conftest import build_tiny_model
    from tests.helpers import leftovers, run_cli

    source = build_tiny_model(arch, tmp_path / arch, with_tokenizer=True)
    out = tmp_path / "out"
    result = run_cli("convert", source, "--span", "2-3", "--exporter", "genai", "-o", out)
    assert result.exit_code == 2 and message in result.stderr and "default exporter" in result.stderr
    assert not leftovers(out)


def test_a_model_without_tokenizer_files_is_refused_before_the_builder_runs(tiny_llama, tmp_path):
    from tests.helpers import run_cli

    result = run_cli("convert", tiny_llama, "--span", "3-4", "--exporter", "genai", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "tokenizer files" in result.stderr


def test_every_input_and_output_of_the_gqa_sa_graph_keeps_type_and_shape(genai_tiny_llama):
    """What onnx.checker's full check requires of graph inputs and outputs, the shared layers'
    presents included. (The full check itself also rejects the builder's unshared graph: it uses
    ONNX Runtime's SimplifiedLayerNormalization in the ONNX domain, which ONNX does not define.)"""
    graph = onnx.load(genai_tiny_llama / "model.onnx", load_external_data=False).graph
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        assert tensor.elem_type != 0 and tensor.HasField("shape"), value.name
    present = next(o for o in graph.output if o.name == "present.3.value")
    dims = present.type.tensor_type.shape.dim
    assert len(dims) == 4 and (dims[1].dim_value, dims[3].dim_value) == (2, 16)  # 2 KV heads of 16


def test_int4_graph_keeps_the_v_rows_of_the_quantized_projection(tiny_llama_with_tokenizer, tmp_path):
    """The builder's int4 graph: shared layers keep the V rows of the packed MatMulNBits
    (weights, scales) bit for bit; parity passes with fp32 accumulation at the fp32 gate."""

    from sa_export.stages.convert import ConvertRequest, convert

    out = tmp_path / "out"
    result = convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=("3-4",), out=out, precision="int4"))
    assert result.manifest.exporter == "genai" and result.manifest.precision == "int4"
    assert result.parity.passed and result.parity.exact is not None, result.parity.summary_line()
    assert result.parity.exact.logits_max_abs < 1e-3
    model = onnx.load(out / "model.onnx")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    for layer in (3, 4):
        node = nbits[f"sa.layer{layer}.v_proj"]
        assert {a.name: a.i for a in node.attribute}["N"] == 2 * 16  # 2 KV heads of 16
        assert not any(f"layers.{layer}.attn.qkv_proj" in name for name in weights)
    # The anchor keeps its packed rows; a shared layer's V rows equal the anchor-shaped layout's tail.
    anchor_q = weights["model.layers.2.attn.qkv_proj.MatMul.weight_Q4"]
    assert anchor_q.shape[0] == (4 + 2 * 2) * 16
    unshared = tmp_path / "base"
    convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=(), unshared=True, out=unshared, precision="int4", check=False))
    base = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(unshared / "model.onnx").graph.initializer}
    for suffix in ("Q4", "scales"):
        packed = base[f"model.layers.3.attn.qkv_proj.MatMul.weight_{suffix}"]
        np.testing.assert_array_equal(weights[f"sa.layer3.v_proj.weight_{'Q' if suffix == 'Q4' else 'scales'}"], packed[(4 + 2) * 16 :])


def _convert_mapped(model, tmp_path_factory, head_map: str):
    from sa_export.stages.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp(f"genai-{head_map}") / "out"
    result = convert(ConvertRequest(model=str(model), spans=("2-3", "5-5"), out=out, exporter="genai", head_map=head_map, calib_tokens=512))
    assert result.parity.passed, result.parity.summary_line()
    return out, result.plan


@pytest.fixture(scope="module")
def genai_tiny_llama_argmax(tiny_llama_with_tokenizer, tmp_path_factory):
    """One source head per shared head, from two layers (argmax-any), two spans: parity-checked."""
    out, plan = _convert_mapped(tiny_llama_with_tokenizer, tmp_path_factory, "argmax-any")
    assert any(h.width == 1 and h.layers != (plan.anchors[l],) for l, h in plan.head_maps.items())
    # two heads of a KV group read the same source head somewhere: their attention is computed once
    assert any(len({(pairs[0], h // 2) for h, pairs in enumerate(m.sources)}) < 4 for m in plan.head_maps.values())
    return out


def test_calibrated_is_argmax_and_the_manifest_says_so(tiny_llama_with_tokenizer, tmp_path_factory):
    out, plan = _convert_mapped(tiny_llama_with_tokenizer, tmp_path_factory, "calibrated")
    assert plan.head_maps and all(h.width == 1 and h.layers == (plan.anchors[l],) for l, h in plan.head_maps.items())
    head_map = Manifest.read(out).head_map
    assert (head_map["mode"], head_map["method"]) == ("calibrated", "argmax")


@pytest.fixture(scope="module")
def genai_tiny_llama_argmax_group(tiny_llama_with_tokenizer, tmp_path_factory):
    """One anchor head of its own KV group per shared head (argmax-group), two spans: parity-checked."""
    out, plan = _convert_mapped(tiny_llama_with_tokenizer, tmp_path_factory, "argmax-group")
    read = [pairs[0] for h in plan.head_maps.values() for pairs in h.sources]
    assert read and any(j != h % 4 for h, (_, j) in enumerate(read))  # not all identity
    return out


def test_argmax_group_maps_recompute_like_identity_with_permuted_queries(genai_tiny_llama_argmax_group):
    """No copy of a cache's heads: one grouped GQA on the anchor's K cache (its rows before the step), its queries gathered."""
    model = onnx.load(genai_tiny_llama_argmax_group / "model.onnx", load_external_data=False)
    plan = Manifest.read(genai_tiny_llama_argmax_group).plan
    for layer, anchor in plan.anchors.items():
        (node,) = [n for n in _nodes_by_op(model, "If") if f"sa.layer{layer}.attention_by_phase" == n.name]
        prefill = _branches(node)["else_branch"]
        (gqa,) = [n for n in prefill.node if n.op_type == "GroupQueryAttention"]
        (past_keys,) = [n for n in prefill.node if n.output[0] == gqa.input[3]]
        assert {a.name: a.i for a in gqa.attribute}["kv_num_heads"] == 2 and past_keys.input[0] == f"present.{anchor}.key"
        assert not [n for n in prefill.node if n.op_type == "Gather" and "cache" in n.name]


def test_one_source_head_maps_recompute_at_prefill_from_their_source_layers(genai_tiny_llama_argmax):
    """Each mapped layer's prefill branch runs one GQA per (source layer, key group, value
    group) pair, with one KV head and one query per source head read through it (heads of a
    group that read the same head share it); no GQA outside an If emits probabilities."""
    model = onnx.load(genai_tiny_llama_argmax / "model.onnx", load_external_data=False)
    plan = Manifest.read(genai_tiny_llama_argmax).plan
    assert not [n for n in _nodes_by_op(model, "GroupQueryAttention") if len(n.output) > 3 and n.output[3]]
    # As many Ifs as an identity plan: one per source and per shared layer, whose decode
    # branch gathers its heads from the source's padded probabilities.
    ifs = _nodes_by_op(model, "If")
    sources = {n.output[3]: n for n in ifs if len(n.output) == 4}
    assert len(ifs) == len(sources) + len(plan.anchors) and len(sources) == len({s for m in plan.head_maps.values() for s in m.layers})
    for layer, head_map in plan.head_maps.items():
        (node,) = [n for n in _nodes_by_op(model, "If") if f"sa.layer{layer}.attention_by_phase" == n.name]
        step = _branches(node)["then_branch"].node
        (gather,) = [n for n in step if n.name.endswith(".then.heads")]
        stacked = [n.input for n in step if n.output[0] == gather.input[0]]  # a Concat when it reads several layers
        read = list(stacked[0]) if stacked else [gather.input[0]]
        assert [sources[name].output[1] for name in read] == [f"present.{source}.key" for source in head_map.layers]
        recomputed = [n for n in _branches(node)["else_branch"].node if n.op_type == "GroupQueryAttention"]
        heads = [{a.name: a.i for a in gqa.attribute} for gqa in recomputed]
        assert all(h["kv_num_heads"] == 1 for h in heads)
        slots = {(source, j, h // 2) for h, ((source, j),) in enumerate(head_map.sources)}
        assert len(recomputed) == len({(source, j // 2, group) for source, j, group in slots})
        assert sum(h["num_heads"] for h in heads) == len(slots)
        # Nothing is computed twice but the source's K cache rows, copied per pair so
        # that one copy at a time is held.
        computed = [(n.op_type, tuple(n.input)) for n in _branches(node)["else_branch"].node if not n.name.endswith(".key_cache")]
        assert len(computed) == len(set(computed))


def test_distinct_rows_keep_one_row_per_source_head_and_kv_group():
    from graph_passes.share_gqa import _distinct_rows

    # SmolLM2 layer 20's calibrated map: 9 heads, 3 KV groups; group 0 reads heads 0 and 4, the others head 0 only.
    rows, slots = _distinct_rows(np.array([0, 4, 0, 0, 0, 0, 0, 0, 0]), 3)
    np.testing.assert_array_equal(rows, [[0, 4], [0, 0], [0, 0]])
    assert slots == [0, 1, 0, 2, 2, 2, 4, 4, 4]
    assert [rows.reshape(-1)[s] for s in slots] == [0, 4, 0, 0, 0, 0, 0, 0, 0]
    permuted, none = _distinct_rows(np.array([2, 1, 0, 5, 4, 3, 0, 1, 2]), 3)  # all distinct per group: nothing saved
    assert none is None and permuted.shape == (3, 3)


def _with_head_maps(out, genai_argmax, tiny_llama_with_tokenizer, tmp_path, heads: tuple[int, ...], gains: tuple[float, ...]):
    """OUT: the argmax fixture's plan with every shared layer reading anchor heads ``heads``
    with ``gains``, rewritten from the unshared builder graph. Returns the anchors."""
    import json
    import shutil

    from graph_passes.apply import apply_sharing_plan
    from sa_export.core.plan import SharingPlan
    from sa_export.export.onnx_io import save_onnx
    from sa_export.stages.convert import ConvertRequest, convert

    unshared = tmp_path / "base"
    convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=(), unshared=True, out=unshared, exporter="genai", check=False))
    shutil.copytree(genai_argmax, out)
    manifest = json.loads((out / "sa_manifest.json").read_text())
    anchors = {int(layer): anchor for layer, anchor in manifest["plan"]["shared"].items()}
    manifest["plan"]["head_maps"] = {
        str(layer): {"sources": [[[anchor, j]] for j in heads], "weights": [[g] for g in gains]} for layer, anchor in anchors.items()
    }
    plan = SharingPlan.from_json(manifest["plan"])
    (out / "sa_manifest.json").write_text(json.dumps(manifest))
    graph = load_onnx(unshared / "model.onnx")
    apply_sharing_plan(graph, plan)
    (out / "model.onnx").unlink()
    save_onnx(graph, out)
    return anchors


def test_decode_multiplies_each_source_head_once_per_kv_group(genai_tiny_llama_argmax, tiny_llama_with_tokenizer, tmp_path):
    """When the heads of a KV group read one source head twice, a decode step computes that
    head's row of P·V once and gathers each head's output from the rows; its logits equal
    those of the prefill branch, which runs one attention per head read."""
    out = tmp_path / "twice"
    # 4 heads, 2 KV groups: group 0 reads anchor head 1 twice, group 1 anchor head 0 twice (another group's keys).
    anchors = _with_head_maps(out, genai_tiny_llama_argmax, tiny_llama_with_tokenizer, tmp_path, (1, 1, 0, 0), (1.0,) * 4)
    model = onnx.load(out / "model.onnx", load_external_data=False)
    for layer in anchors:
        (node,) = [n for n in _nodes_by_op(model, "If") if f"sa.layer{layer}.attention_by_phase" == n.name]
        step = f"sa.layer{layer}.attention_by_phase.then"
        assert [n.name for n in _branches(node)["then_branch"].node if n.op_type == "Gather"] == [f"{step}.heads", f"{step}.context_by_head"]
    _assert_prefill_and_decode_agree(out)


def test_one_source_maps_with_gains_scale_both_branches_alike(genai_tiny_llama_argmax, tiny_llama_with_tokenizer, tmp_path):
    """A gain per head (one source each) scales the gathered probabilities at decode and the
    recomputed outputs at prefill: any mix of the two gives the logits of one call."""
    out = tmp_path / "gains"
    _with_head_maps(out, genai_tiny_llama_argmax, tiny_llama_with_tokenizer, tmp_path, (1, 1, 0, 0), (0.5, 1.5, 1.0, 0.8))
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert any(n.op_type == "Mul" and n.name.endswith(".then.gains") for node in _nodes_by_op(model, "If") for n in _branches(node)["then_branch"].node)
    _assert_prefill_and_decode_agree(out)


@pytest.mark.parametrize("fixture", ["genai_tiny_llama", "genai_tiny_llama_argmax", "genai_tiny_llama_argmax_group"])
def test_prefill_and_decode_branches_give_the_same_logits(fixture, request):
    """Rows fed together (recomputed attention) and one by one (stored probabilities), in any
    mix, give the logits of one call: each branch continues a cache the other wrote."""
    _assert_prefill_and_decode_agree(request.getfixturevalue(fixture))


def _assert_prefill_and_decode_agree(out) -> None:
    from sa_export.runtime import SAModel

    model = SAModel(out)
    ids = np.random.default_rng(5).integers(3, 100, (1, 11))
    whole, _, _ = model.forward(ids, np.ones_like(ids), model.empty_cache(1, 16))
    for steps in (((0, 5), (5, 6), (6, 7), (7, 11)), tuple((i, i + 1) for i in range(11))):
        cache, pieces = model.empty_cache(1, 16), []
        for lo, hi in steps:
            logits, cache, _ = model.forward(ids[:, lo:hi], np.ones((1, hi), np.int64), cache)
            pieces.append(logits)
        np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=1e-5)

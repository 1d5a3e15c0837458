"""Part of a layer shared on the GroupQueryAttention graph: a GQA over the kept groups, a V cache of the borrowed groups."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from sa_export.accuracy.parity import run_parity
from sa_export.core.manifest import Manifest
from sa_export.core.plan import HeadMap, SharingPlan
from sa_export.hf.models import load_reference, resolve_model
from sa_export.runtime import SAModel
from sa_export.stages.convert import ConvertRequest, convert
from tests.conftest import build_sharp_llama
from tests.graph_passes.test_share_gqa import _assert_prefill_and_decode_agree
from tests.graph_passes.test_share_kv_groups import assert_borrows_group_0_of_layer_3
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """conftest's sharp tiny Llama with its tokenizer, which the builder needs."""
    return build_sharp_llama(tmp_path_factory.mktemp("sharp-gqa") / "llama", with_tokenizer=True)


@pytest.fixture(scope="module")
def gqa_group(sharp_llama, tmp_path_factory):
    """Group 0 of layer 3 (heads 0 and 1, before the kept 2 and 3) and the whole of layer 4, on the builder's graph; parity checked by convert."""
    out = tmp_path_factory.mktemp("gqa-groups") / "sa"
    result = convert(ConvertRequest(model=str(sharp_llama), spans=("3.0", "4"), out=out))
    assert result.parity.passed and result.manifest.exporter == "genai"  # the default CPU graph takes groups
    return out


@pytest.fixture(scope="module")
def unshared_builder_graph(sharp_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa-base") / "base"
    convert(ConvertRequest(model=str(sharp_llama), spans=(), unshared=True, out=out, exporter="genai", check=False))
    return out / "model.onnx"


def test_the_kept_groups_keep_a_gqa_and_k_and_v_caches_of_their_own(gqa_group):
    manifest = Manifest.read(gqa_group)
    layer = manifest.layout[3]
    assert (layer.key_heads, layer.value_heads) == (1, 1)
    assert (layer.borrowed_value_input, layer.borrowed_value_output) == ("past_key_values.3.borrowed_value", "present.3.borrowed_value")
    assert [manifest.cache.kv_heads_of(f"past_key_values.3.{kind}") for kind in ("key", "value", "borrowed_value")] == [1, 1, 1]
    assert manifest.cache.kv_heads_of("past_key_values.2.value") == 2 and not manifest.layout[4].has_key
    assert manifest.cache.savings.fraction_saved == pytest.approx(1.5 / 12)  # layer 4's K cache and half of layer 3's
    model = onnx.load(gqa_group / "model.onnx", load_external_data=False)
    (kept,) = [n for n in model.graph.node if n.name == "sa.layer3.kept_heads_gqa"]
    attributes = {a.name: a.i for a in kept.attribute}
    assert (attributes["num_heads"], attributes["kv_num_heads"]) == (2, 1)
    assert list(kept.input[3:5]) == ["past_key_values.3.key", "past_key_values.3.value"]
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in [*model.graph.input, *model.graph.output]}
    assert shapes["past_key_values.3.borrowed_value"][1] == shapes["present.3.value"][1] == 1 and shapes["past_key_values.2.value"][1] == 2
    # The kept heads' packed projection: Q of heads 2-3, K and V of group 1 (16 wide each).
    packed = {i.name: i for i in model.graph.initializer}["sa.layer3.kept_qkv.weight"]
    assert list(packed.dims)[-1] == (2 + 1 + 1) * 16


def test_the_graph_matches_the_reference_that_borrows_those_heads_and_no_other(gqa_group, sharp_llama):
    # This graph's parity runs on unpadded prompts only, whose attention is so peaked that
    # the anchor and layer 3 agree on them: the decode steps tell the groups apart.
    assert_borrows_group_0_of_layer_3(gqa_group, sharp_llama, logits="decode/logits")


def test_prefill_and_decode_branches_give_the_same_logits(gqa_group):
    _assert_prefill_and_decode_agree(gqa_group)


# Layer 4 reading the heads layer 3 keeps (2 and 3): from its kept GQA's stored probabilities.
KEPT = {4: HeadMap((((3, 2), (2, 0)), ((3, 3), (2, 1)), ((3, 3), (2, 2)), ((3, 2), (2, 3))), ((0.6, 0.4),) * 4)}
KEPT_ONE_SOURCE = {4: HeadMap.from_anchor_heads(3, (3, 2, 2, 3))}


@pytest.mark.parametrize(
    "head_maps",
    [
        # one source head each, from another KV group: a Gather at decode, GQA per pair at prefill
        {3: HeadMap.from_anchor_heads(2, (3, 1, 0, 2))},
        {3: HeadMap(tuple(((2, j),) for j in (1, 1, 0, 0)), ((0.5,), (1.5,), (1.0,), (1.0,)))},  # one source each, with gains
        {3: HeadMap((((2, 3), (1, 0)), ((2, 1), (1, 2)), ((2, 0), (1, 1)), ((2, 2), (1, 3))), ((0.7, 0.3),) * 4)},  # mixtures of two layers
        {3: HeadMap.from_anchor_heads(2, (3, 1, 0, 2)), **KEPT},  # a later layer mixes layer 3's kept heads with its anchor's
        KEPT_ONE_SOURCE,  # one source each, all of them layer 3's kept heads: stored, as mixtures
    ],
)
def test_head_maps_reach_the_borrowed_heads_in_head_order(gqa_group, unshared_builder_graph, sharp_llama, tmp_path, head_maps):
    """Layer 3's borrowed heads read the map's rows 0 and 1, before its kept heads: any slip
    in which rows it takes or where they go back, or in which of layer 3's kept heads layer 4
    reads, moves the logits, which parity compares with the reference under the same maps."""
    from graph_passes.apply import apply_sharing_plan
    from sa_export.export.onnx_io import load_onnx, save_onnx

    out = tmp_path / "mapped"
    shutil.copytree(gqa_group, out)
    manifest = json.loads((out / "sa_manifest.json").read_text())
    plan = SharingPlan.from_json(manifest["plan"]).with_head_maps(head_maps)
    manifest["plan"] = plan.to_json()
    (out / "sa_manifest.json").write_text(json.dumps(manifest))
    graph = load_onnx(unshared_builder_graph)
    apply_sharing_plan(graph, plan)
    (out / "model.onnx").unlink()
    save_onnx(graph, out)
    model, tokenizer = load_reference(resolve_model(str(sharp_llama)), allow_pickle=False)
    report = run_parity(SAModel(out), model, plan, tokenizer, decode_steps=4)
    assert report.passed, report.summary_line()
    unmapped = run_parity(SAModel(out), model, Manifest.read(gqa_group).plan, tokenizer, decode_steps=4)
    assert not unmapped.passed  # the maps change the model
    _assert_prefill_and_decode_agree(out)


def test_int4_keeps_the_quantized_rows_of_each_part(sharp_llama, tmp_path):
    # The reference takes the graph's dequantized weights, the kept and borrowed rows put back
    # in place; with fp32 accumulation the graph is held to the fp32 gate.
    result = convert(ConvertRequest(model=str(sharp_llama), spans=("3.0", "4"), out=tmp_path / "sa", precision="int4"))
    assert result.manifest.exporter == "genai" and result.parity.exact is not None and result.parity.exact.passed
    assert result.parity.exact.logits_max_abs < 1e-4


def test_calibrated_maps_may_read_kept_heads_on_the_builders_graph(sharp_llama, tmp_path):
    """A calibrated map that reads the heads a partly shared layer keeps converts to the builder's graph and passes parity."""
    result = run_cli("convert", sharp_llama, "--span", "3.1", "--span", "4", "--head-map", "mix", "-o", tmp_path / "sa")
    assert result.exit_code == 0 and "parity PASSED" in result.output, result.output + result.stderr
    manifest = Manifest.read(tmp_path / "sa")
    assert manifest.plan.reads_kept_heads and manifest.exporter == "genai"

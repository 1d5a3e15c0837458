"""The manifest: one typed reader that validates, one atomic writer, the JSON runtimes read."""

import json

import pytest

from sa_export.core.manifest import MANIFEST_NAME, Manifest, ManifestError


def test_a_converted_manifest_round_trips_unchanged(converted_tiny_llama, tmp_path):
    data = json.loads((converted_tiny_llama / MANIFEST_NAME).read_text())
    manifest = Manifest.read(converted_tiny_llama)
    assert manifest.to_json() == data
    manifest.write(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == data


def test_typed_fields_agree_with_the_json(converted_tiny_llama):
    manifest = Manifest.read(converted_tiny_llama)
    assert manifest.plan.shared_layers == (3, 4)
    assert [layer.has_key for layer in manifest.layout] == [True, True, True, False, False, True]
    assert manifest.cache.savings.bytes_per_token_saved == 2 * manifest.cache.num_kv_heads * manifest.cache.head_dim * 4
    assert manifest.has_position_ids and manifest.exporter == "dynamo"


@pytest.mark.parametrize("field", ["cache", "plan", "io", "files", "precision"])
def test_a_missing_field_is_one_line_naming_it(field, converted_tiny_llama, tmp_path):
    data = json.loads((converted_tiny_llama / MANIFEST_NAME).read_text())
    del data[field]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"lacks the field '{field}'"):
        Manifest.read(tmp_path)


def test_another_format_and_bad_json_are_refused(converted_tiny_llama, tmp_path):
    data = json.loads((converted_tiny_llama / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, "format": 2}))
    with pytest.raises(ManifestError, match="format 2"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path)


def test_a_changed_artifact_is_refused(converted_tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted_tiny_llama, copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.read(copy).verify_artifacts(copy)


def test_a_partly_shared_layer_has_a_narrower_k_cache():
    from sa_export.core.manifest import CacheInfo, KVSavings, LayerCache

    layers = [
        LayerCache(0, "k0", "pk0", "v0", "pv0"),
        LayerCache(1, "k1", "pk1", "v1", "pv1", key_heads=1),  # one of 3 KV groups kept
        LayerCache(2, None, None, "v2", "pv2"),
    ]
    savings = KVSavings.of(layers, 3, 64, "float32")
    per_head = 64 * 4
    assert savings.bytes_per_token_base == 6 * 3 * per_head
    assert savings.bytes_per_token_sa == (3 + 3 + 1 + 3 + 3) * per_head
    cache = CacheInfo(3, 64, "float32", "", "concat", savings, tuple(layers))
    assert [cache.kv_heads_of(name) for name in ("k0", "k1", "v1")] == [3, 1, 3]
    assert [cache.key_share(layer) for layer in layers] == [1.0, 1 / 3, 0.0]
    assert CacheInfo.from_json(cache.to_json()) == cache
    assert "key_heads" not in layers[0].to_json() and layers[1].to_json()["key_heads"] == 1


def test_a_manifest_path_outside_out_or_a_graph_without_a_hash_is_refused(converted_tiny_llama, tmp_path):
    import json
    import shutil


    outside = tmp_path / "outside.onnx"
    shutil.copy(converted_tiny_llama / "model.onnx", outside)
    edits = {
        "the graph elsewhere": lambda data: data.update(model_file="../outside.onnx"),
        "an absolute graph": lambda data: data.update(model_file=str(outside)),
        "a hashed file elsewhere": lambda data: data["files"].update({"../outside.onnx": "0" * 64}),
        "a graph without its hash": lambda data: data["files"].pop(data.get("model_file", "model.onnx")),
    }
    for case, edit in edits.items():
        out = tmp_path / "out" / case.replace(" ", "_")
        shutil.copytree(converted_tiny_llama, out)
        data = json.loads((out / MANIFEST_NAME).read_text())
        edit(data)
        (out / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(ManifestError):
            Manifest.read(out).require_artifacts(out)
    Manifest.read(converted_tiny_llama).verify_artifacts(converted_tiny_llama)

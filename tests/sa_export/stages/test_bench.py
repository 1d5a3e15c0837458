import json

from sa_export.core.manifest import CacheInfo, KVSavings, LayerCache, Manifest, ModelFacts, SourceInfo
from sa_export.core.plan import SharingPlan
from sa_export.stages.bench import decode_step_cost, qk_projection_bytes
from tests.helpers import run_cli


def _bench(out, tmp_path, *options):
    """Run `bench` on OUT with a private baseline cache; the exit code is checked, the JSON returned."""
    result = run_cli(
        "bench", out, "--prefill-tokens", "8", "--prefill-repeats", "1", "--no-prefill-memory", "--min-seconds", "0", "--interval", "0",
        "--processes", "1", "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png", *options,
    )
    assert result.exit_code == 0, result.output + result.stderr
    return result, json.loads((tmp_path / "b.json").read_text())


def test_bench_compares_sa_with_its_baseline_and_writes_json_and_plot(converted_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    result, data = _bench(converted_tiny_llama, tmp_path, "--contexts", "16,32", "--batches", "1,2", "--repeats", "2", "--prefill-tokens", "8,24", "--prefill-memory", "--memory-runs", "3")
    assert [(r["context"], r["batch"]) for r in data["decode"]] == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert [r["tokens"] for r in data["prefill"]] == [8, 24]
    for row in data["prefill"]:
        assert row["t_base_ms"] > 0 and row["t_sa_ms"] > 0
        for model in ("sa", "base"):  # the median of three processes of its own
            runs = row[f"peak_rss_{model}_runs"]
            assert len(runs) == 3 and min(runs) > 0 and row[f"peak_rss_{model}_bytes"] == sorted(runs)[1]
    above = [f"{r['tokens']} tokens" for r in data["prefill"] if r["peak_rss_sa_bytes"] > r["peak_rss_base_bytes"]]
    verdict = f"SA's prefill peak RSS above the baseline's at: {', '.join(above)}" if above else "not above the baseline's at any length"
    assert verdict in result.output
    for row in data["decode"]:
        assert {"context", "batch", "t_base_ms", "t_sa_ms", "measured_saving", "ideal_saving"} <= set(row)
        assert row["t_base_ms"] > 0 and row["t_sa_ms"] > 0 and 0 < row["ideal_saving"] < 0.5
        assert row["steps"] == 2  # --repeats, with no --min-seconds to extend it
        low, high = row["time_ratio_ci95"]  # a bootstrap over the two pairs
        assert 0 < low <= high and f"{low:.3f}-{high:.3f}" in result.output
        # measured/ideal's interval is the time ratio's: a saving of 1 - ratio, over the ideal
        ideal_low, ideal_high = row["ratio_measured_to_ideal_ci95"]
        assert abs(ideal_low - (1 - high) / row["ideal_saving"]) < 1e-12 and abs(ideal_high - (1 - low) / row["ideal_saving"]) < 1e-12
        assert ideal_low <= row["ratio_measured_to_ideal"] <= ideal_high and f"{ideal_low:.2f}-{ideal_high:.2f}" in result.output
    assert data["interval"] == 0 and data["max_seconds"] == 30
    assert "decode: SA" in result.output and "prefill: SA" in result.output
    peaks = data["timing_peak_rss_bytes"]  # each model timed in a process of its own
    assert peaks["sa"] > 0 and peaks["base"] > 0 and "peak RSS of the timing processes" in result.output
    assert data["kv_bytes_per_token"]["sa"] < data["kv_bytes_per_token"]["base"]
    assert data["weight_bytes"]["sa"] > 0 and data["weight_bytes"]["base"] > 0  # files of two exporters
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "GroupQueryAttention" in data["baseline"]["graph"] and "no sharing" in data["baseline"]["graph"]
    assert "decomposed" in data["sa"]["graph"] and "convert --exporter genai" in result.output


def test_bench_same_export_baseline_is_the_decomposed_graph(converted_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    _, data = _bench(converted_tiny_llama, tmp_path, "--baseline", "same-export", "--contexts", "16", "--batches", "1", "--repeats", "1")
    assert "decomposed" in data["baseline"]["graph"] and "no sharing" in data["baseline"]["graph"]


def test_bench_of_a_fused_graph_runs_against_the_builders_graph(genai_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    result, data = _bench(genai_tiny_llama, tmp_path, "--contexts", "16,64", "--batches", "1", "--repeats", "2", "--memory", "lean", "--processes", "2")
    assert data["sa_graph_kind"] == "fused" and data["memory"] == "lean"
    assert data["processes"] == 2 and "timed on 2 pairs of fresh processes" in result.output
    for row in data["decode"]:  # each point timed on both pairs of processes, each one's ratio kept
        by_process = row["time_ratio_by_process"]
        assert row["steps"] == 4 and len(by_process) == 2
        assert min(by_process) - 1e-9 <= row["time_ratio_sa_to_base"] <= max(by_process) + 1e-9
    assert "GroupQueryAttention" in data["baseline"]["graph"] and "no sharing" in data["baseline"]["graph"]
    assert "TensorScatter" in data["sa"]["graph"]
    assert data["kv_bytes_per_token"]["sa"] < data["kv_bytes_per_token"]["base"]
    assert data["weight_bytes"]["sa"] < data["weight_bytes"]["base"]  # the same graph less Q/K projections
    assert "convert --exporter genai" not in result.output


def test_short_steps_are_sampled_until_min_seconds(genai_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    _, data = _bench(genai_tiny_llama, tmp_path, "--contexts", "16", "--batches", "1", "--repeats", "2", "--min-seconds", "0.3")
    row = data["decode"][0]
    # A tiny model's step takes about a millisecond: 0.3 s holds many more than 2 pairs.
    assert row["steps"] > 10 and row["steps"] * (row["t_base_ms"] + row["t_sa_ms"]) / 1000 < 5


def test_bench_refuses_a_missing_baseline_directory(converted_tiny_llama, tmp_path):
    result = run_cli("bench", converted_tiny_llama, "--baseline", tmp_path / "nope")
    assert result.exit_code == 2 and "no such directory" in result.stderr


def _layer(n: int, k_cache: bool) -> LayerCache:
    key = f"past_key_values.{n}.key" if k_cache else None
    return LayerCache(n, key, key and f"present.{n}.key", f"past_key_values.{n}.value", f"present.{n}.value")


_LAYERS = (_layer(0, True), _layer(1, False))
MANIFEST = Manifest(
    tool={}, source=SourceInfo("tiny", "hf", "/nowhere"), num_layers=2, model=ModelFacts(4, 64, 100),
    plan=SharingPlan(2, {1: 0}),
    cache=CacheInfo(2, 16, "float32", "", "concat", KVSavings.of(list(_LAYERS), 2, 16, "float32"), _LAYERS),
    io={}, precision="fp32", target="cpu", exporter="dynamo", opset=18, eos_token_ids=(), files={},
)


def test_decode_cost_grows_with_context_and_batch():
    small, large = decode_step_cost(MANIFEST, 1000, 10, 1), decode_step_cost(MANIFEST, 1000, 100, 2)
    assert small.bytes == 1000 + 10 * 384 and large.bytes == 1000 + 2 * 100 * 384  # 3 tensors x 2 heads x 16 x 4 B
    assert large.flops > small.flops


def test_removed_projection_bytes_count_q_and_k_of_shared_layers():
    # One shared layer: hidden 64 x (4 query + 2 key heads) x head dim 16, fp32.
    assert qk_projection_bytes(MANIFEST) == 64 * 6 * 16 * 4


def test_the_baseline_follows_the_model_files_content_not_their_path(converted_tiny_llama, tmp_path, monkeypatch):
    """A model saved again in place is a new baseline: a bench after a model change compares with the new model."""
    import dataclasses
    import shutil

    from sa_export.core.manifest import MANIFEST_NAME
    from sa_export.stages.bench import SAME_EXPORT, baseline_dir

    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    built = []

    def build(manifest, target, exporter):
        built.append(target)
        target.mkdir(parents=True)
        (target / MANIFEST_NAME).write_text("{}")

    monkeypatch.setattr("sa_export.stages.baseline.build_baseline", build)
    manifest = Manifest.read(converted_tiny_llama)
    model = shutil.copytree(manifest.source.path, tmp_path / "model")
    manifest = dataclasses.replace(manifest, source=dataclasses.replace(manifest.source, path=str(model), model=str(model)))
    first = baseline_dir(converted_tiny_llama, manifest, SAME_EXPORT)
    assert baseline_dir(converted_tiny_llama, manifest, SAME_EXPORT) == first and built == [first]
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert baseline_dir(converted_tiny_llama, manifest, SAME_EXPORT) != first and len(built) == 2


def test_baselines_no_longer_used_go_past_the_cache_limit(converted_tiny_llama, tmp_path, monkeypatch):
    import os

    from sa_export.core.manifest import MANIFEST_NAME
    from sa_export.stages.bench import SAME_EXPORT, baseline_dir

    monkeypatch.setenv("SA_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SA_EXPORT_CACHE_EXPORTS_GB", "0")
    old, recent = (tmp_path / "cache" / "baselines" / name for name in ("old", "recent"))
    for entry in (old, recent):
        entry.mkdir(parents=True)
        (entry / MANIFEST_NAME).write_text("{}")
    os.utime(old, (0, 0))  # last used long ago; "recent" may be another bench's, in use

    def build(manifest, target, exporter):
        target.mkdir(parents=True)
        (target / MANIFEST_NAME).write_text("{}")

    monkeypatch.setattr("sa_export.stages.baseline.build_baseline", build)
    target = baseline_dir(converted_tiny_llama, Manifest.read(converted_tiny_llama), SAME_EXPORT)
    assert target.is_dir() and recent.is_dir() and not old.exists()


def test_the_baseline_follows_the_packages_and_the_passes_that_build_it(converted_tiny_llama, monkeypatch):
    """An upgrade of an exporting package, or a change of a graph pass, is a new baseline:
    the bench never compares with a graph the installed code would no longer build."""
    from sa_export.export import exporter_of_manifest
    from sa_export.export import cache
    from sa_export.stages import baseline

    manifest = Manifest.read(converted_tiny_llama)
    exporter = exporter_of_manifest(manifest.exporter)
    key = baseline.baseline_key(manifest, exporter)
    assert baseline.baseline_key(manifest, exporter) == key
    version = cache._version
    monkeypatch.setattr(cache, "_version", lambda package: "99.0" if package == "onnxruntime-genai" else version(package))
    assert baseline.baseline_key(manifest, exporter) != key
    monkeypatch.setattr(cache, "_version", version)
    digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path: "changed" if path.name == "apply.py" else digest(path))
    assert baseline.baseline_key(manifest, exporter) != key


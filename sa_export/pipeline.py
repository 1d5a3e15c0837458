"""`convert`: export, rewrite, save atomically, check. One function per CLI command lives here."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import onnx_ir as ir

from graph_passes import Fp32SoftmaxPass, RewriteReport, apply_sharing_plan, cache_layers
from graph_passes.share_gqa import is_gqa_graph
from sa_export import __version__
from sa_export.atomic import atomic_directory, refuse_existing
from sa_export.compare import TOLERANCES, ParityReport
from sa_export.errors import CheckFailed, ParityError, UsageError
from sa_export.export import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    GENAI_UNSUPPORTED,
    REMOVED_EXPORTERS,
    attention_for_export,
    export_genai,
    export_model,
    refuse_unknown_exporter,
)
from sa_export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    LayerCache,
    artifact_hashes,
    read_manifest,
    write_json_atomic,
)
from sa_export.models import (
    ALIASES,
    ModelSource,
    accepted_unknown_keys,
    load_config,
    load_hf_model,
    load_reference,
    resolve_model,
    saved_by_version,
    transformers_version,
)
from sa_export.onnx_io import load_onnx, save_onnx
from sa_export.plan import SharingPlan, Span, build_plan
from sa_export.progress import console, step
from targets.profiles import get_target

PARITY_NAME = "parity.json"
SAMPLE_PROMPT = "The capital of France is"
_ONNX_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64"}


@dataclasses.dataclass(frozen=True)
class ConvertRequest:
    model: str
    spans: tuple[str, ...]
    out: Path
    anchors: tuple[int, ...] = ()
    target: str = "cpu"
    precision: str | None = None  # None: the target's default
    check: bool = True
    overwrite: bool = False
    force: bool = False
    reference: str | None = None
    allow_pickle: bool = False
    decode_steps: int = 32
    head_map: str = "identity"
    calib_file: str | None = None
    calib_tokens: int = 4096
    max_batch: int | None = None  # None: the target's
    max_context: int | None = None  # None: the target's; given: exit 1 when it does not fit
    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    accept_unknown_config_keys: bool = False


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    out: Path
    plan: SharingPlan
    rewrite: RewriteReport
    manifest: dict
    parity: ParityReport | None
    timings: dict[str, float]
    sample: str | None
    target: TargetReport | None = None

    def summary_json(self) -> dict:
        return {
            "out": str(self.out),
            "shared_layers": list(self.plan.shared_layers),
            "anchors": {str(k): v for k, v in self.plan.anchors.items()},
            "kv_cache": self.manifest["cache"]["savings"],
            "weight_bytes_removed": self.rewrite.weight_bytes_removed,
            "parity": self.parity.summary_json() if self.parity else None,
            "timings_s": self.timings,
            "sample": self.sample,
        }


def _cache_layout(graph: ir.Graph, num_layers: int) -> list[LayerCache]:
    inputs = cache_layers(graph)
    outputs = {v.name for v in graph.outputs}
    layout = []
    for layer in range(num_layers):
        names = inputs.get(layer, {})

        def present(kind: str) -> str | None:
            name = f"present.{layer}.{kind}"
            return name if kind in names and name in outputs else None

        layout.append(LayerCache(layer, names.get("key"), present("key"), names.get("value"), present("value")))
    return layout


def _cache_facts(graph: ir.Graph) -> dict:
    """KV heads, head dim and dtype, read from the first value-cache input of the graph."""
    value = next(v for v in graph.inputs if v.name.endswith(".value") and v.name.startswith("past_key_values."))
    shape = value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise UsageError(f"cache input {value.name} has shape {shape}; expected [batch, kv_heads, past, head_dim]")
    return {"num_kv_heads": shape[1], "head_dim": shape[3], "dtype": _ONNX_DTYPES.get(value.dtype, str(value.dtype))}


def _buffer_scheme(graph: ir.Graph, config) -> dict:
    """How presents relate to pasts: a longer copy each step, or the same buffer written in place."""
    if is_gqa_graph(graph):
        return {
            "layout": "[batch, num_kv_heads, max_length, head_dim]",
            "buffer": "shared",  # bind each present to its past's buffer; the graph writes the new rows
            "max_length": getattr(config, "max_position_embeddings", None),
        }
    return {"layout": "[batch, num_kv_heads, past_sequence_length, head_dim]", "buffer": "concat"}


def kv_savings(layout: list[LayerCache], facts: dict) -> dict:
    itemsize = 2 if facts["dtype"] == "float16" else 4
    per_tensor = facts["num_kv_heads"] * facts["head_dim"] * itemsize
    base = 2 * len(layout) * per_tensor
    sa = sum(per_tensor * (layer.has_key + layer.has_value) for layer in layout)
    return {
        "bytes_per_token_base": base,
        "bytes_per_token_sa": sa,
        "bytes_per_token_saved": base - sa,
        "fraction_saved": round((base - sa) / base, 6) if base else 0.0,
    }


def _eos_ids(config) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _provenance(source: ModelSource, config, request: ConvertRequest) -> dict:
    """The release that saved the checkpoint, and keys of it that the exporting release ignored."""
    if config is None:
        return {"saved_by_transformers": None, "accepted_unknown_config_keys": []}
    reference = _reference_source(request, source)
    # Without the flag, load_config has already refused any unknown key: nothing to look up.
    accepted = accepted_unknown_keys(reference) if request.accept_unknown_config_keys else []
    return {"saved_by_transformers": saved_by_version(reference), "accepted_unknown_config_keys": accepted}


def build_manifest(
    source: ModelSource, config, plan: SharingPlan, graph: ir.Graph, files: list[str], out_dir: Path, request: ConvertRequest
) -> dict:
    layout = _cache_layout(graph, plan.num_layers)
    facts = _cache_facts(graph)
    return {
        "format": FORMAT_VERSION,
        "tool": {"name": "sa-export", "version": __version__, "transformers": transformers_version()},
        "source": {
            "model": source.name,
            "kind": source.kind,
            "path": str(source.path),
            "reference": request.reference,
            "architecture": (config.architectures or [config.model_type])[0] if config is not None else None,
            "model_type": config.model_type if config is not None else None,
            **_provenance(source, config, request),
        },
        "num_layers": plan.num_layers,
        "model": {
            "num_heads": config.num_attention_heads,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        }
        if config is not None
        else None,
        "plan": plan.to_json(),
        "cache": {
            **facts,
            **_buffer_scheme(graph, config),
            "savings": kv_savings(layout, facts),
            "layers": [layer.to_json() for layer in layout],
        },
        "model_file": "model.onnx",
        "io": {v.name: _ONNX_DTYPES.get(v.dtype, str(v.dtype).lower()) for v in [*graph.inputs, *graph.outputs]},
        "precision": request.precision,
        "target": request.target,
        "exporter": request.exporter,
        "opset": graph.opset_imports.get("", None),
        "eos_token_ids": _eos_ids(config) if config is not None else [],
        "files": artifact_hashes(out_dir, files),
        "parity": None,
    }


def _reference_source(request: ConvertRequest, source: ModelSource) -> ModelSource | None:
    if source.kind == "hf":
        return source
    if request.reference is None:
        return None
    reference = resolve_model(request.reference)
    if reference.kind != "hf":
        raise UsageError(f"--reference {request.reference!r} must be a Hugging Face model directory or alias")
    return reference


def convert(request: ConvertRequest) -> ConvertResult:
    out = Path(request.out)
    refuse_existing(out, request.overwrite)
    for span in request.spans:
        Span.parse(span)  # fail on a malformed span before loading anything
    source = resolve_model(request.model)
    reference = _reference_source(request, source)
    if source.kind == "onnx" and reference is None and request.check:
        raise UsageError("checking an ONNX input needs its PyTorch model: pass --reference HF_DIR (or --no-check)")
    if source.kind == "onnx" and reference is None and request.head_map != "identity":
        raise UsageError(f"--head-map {request.head_map} calibrates on the PyTorch model: pass --reference HF_DIR")
    config = load_config(reference, request.accept_unknown_config_keys) if reference is not None else None
    target = get_target(request.target)
    precision = request.precision or target.default_precision
    if precision not in target.precisions:
        raise UsageError(f"target {target.name} does not take --precision {precision}; it takes {', '.join(target.precisions)}")
    request = dataclasses.replace(request, precision=precision, target=target.name)
    refuse_unknown_exporter(request.exporter)
    if request.exporter != "dynamo" and request.opset not in (None, DEFAULT_OPSET):
        raise UsageError(f"--opset applies to --exporter dynamo; {request.exporter} chooses its own")
    if request.exporter == "genai" and config is not None and config.model_type in GENAI_UNSUPPORTED:
        raise UsageError(f"--exporter genai: {GENAI_UNSUPPORTED[config.model_type]}")
    if request.exporter == "genai" and config is not None and _has_sliding_window(config):
        raise UsageError(
            f"--exporter genai: onnxruntime-genai's graph for {config.model_type} attends to the whole context, "
            f"not the model's sliding window of {config.sliding_window}; use the default exporter"
        )
    if request.exporter == "genai" and (target.uses_tensorrt or source.kind != "hf"):
        raise UsageError(
            "--exporter genai builds an ONNX Runtime graph (com.microsoft GroupQueryAttention) from a Hugging Face model: "
            "use it with --target cpu; TensorRT targets take the default exporter"
        )
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if source.kind == "onnx":
        graph_model = load_onnx(source.path)
        num_layers = len(cache_layers(graph_model.graph))
        if precision != _cache_facts(graph_model.graph)["dtype"].replace("float", "fp"):
            raise UsageError(f"--precision {precision} needs an ONNX export in that precision, or convert the Hugging Face model instead")
    else:
        graph_model = None
        num_layers = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None) if config is not None else None
    plan = build_plan(list(request.spans), num_layers, request.anchors, kinds, request.force)
    if config is not None and config.num_hidden_layers != num_layers:
        raise UsageError(f"--reference has {config.num_hidden_layers} layers but the ONNX graph has {num_layers}")

    hf_model = tokenizer = None
    with atomic_directory(out, request.overwrite) as tmp:
        if reference is not None:
            hf_model, tokenizer = load_reference(reference, request.allow_pickle, timings)
        calibration = None
        if request.head_map != "identity":
            if tokenizer is None:
                raise UsageError(f"--head-map {request.head_map} calibrates on text, and {reference.name} has no tokenizer; use --head-map identity")
            from sa_export.evaluate import calibrated_plan
            from sa_export.texts import split_texts

            _, calibration = split_texts(tokenizer, None, request.calib_file, 0, request.calib_tokens)
            plan = calibrated_plan(hf_model, plan, request.head_map, calibration, kinds)
        if graph_model is None:
            with step(f"exporting to ONNX with {export_description(request.exporter, precision, request.opset)}", timings, "export"):
                graph_model = _export_graph(reference, hf_model, request, tmp / "export")
        with step(f"rewriting the graph: {plan.describe()}", timings, "passes"):
            if precision == "fp16":
                Fp32SoftmaxPass()(graph_model)
            rewrite = apply_sharing_plan(graph_model, plan)
        with step("saving model.onnx", timings, "save"):
            files = save_onnx(graph_model, tmp)
            shutil.rmtree(tmp / "export", ignore_errors=True)
            if tokenizer is not None:
                before = set(p.name for p in tmp.iterdir())
                tokenizer.save_pretrained(tmp)
                files += sorted(set(p.name for p in tmp.iterdir()) - before)
        manifest = build_manifest(source, config, plan, graph_model.graph, files, tmp, request)
        manifest["head_map"] = {"mode": request.head_map, "calibration": calibration.to_json() if calibration else None}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        # A graph the target's TensorRT cannot take fails before the (longer) parity check.
        profiles = target_profiles(manifest, graph_model, target, request) if target.uses_tensorrt else None

        parity = None
        if request.check:
            parity = check_directory(tmp, hf_model, tokenizer, request.decode_steps, timings)
            manifest = read_manifest(tmp)
        target_report = None
        if profiles is not None:
            target_report = prepare_target(tmp, manifest, files, graph_model, target, request, profiles, timings)
            manifest = read_manifest(tmp)
        sample = None
        if tokenizer is not None:
            from sa_export.runtime import SAModel

            with step("sample generation", timings, "generate"):
                sample = SAMPLE_PROMPT + "".join(SAModel(tmp).generate(SAMPLE_PROMPT, max_new_tokens=20))
        timings["total"] = round(time.perf_counter() - started, 3)
    return ConvertResult(out.absolute(), plan, rewrite, manifest, parity, timings, sample, target_report)


@dataclasses.dataclass(frozen=True)
class TargetReport:
    memory: object  # targets.memory.MemoryFit
    bundle: Path | None
    engine: Path | None
    max_context_requested: bool

    @property
    def fits(self) -> bool:
        return self.memory.fits_sa


def _target_limits(request: ConvertRequest, target) -> tuple[int, int]:
    """Batch and context to plan for: the request's, else the target's defaults."""
    return request.max_batch or target.max_batch, request.max_context or target.max_context


def target_profiles(manifest: dict, graph_model, target, request: ConvertRequest) -> list:
    """Optimization profiles for the target, after checking that its TensorRT takes the graph."""
    from targets.compat import check_compatibility, raise_if_incompatible
    from targets.shapes import profiles_for

    if manifest.get("model") is None:
        raise UsageError("memory fit for a TensorRT target needs the model's config: pass --reference HF_DIR")
    batch, context = _target_limits(request, target)
    profiles = profiles_for(manifest, batch, context, min(target.max_prefill, context))
    raise_if_incompatible(check_compatibility(graph_model, target, profiles))
    return profiles


def prepare_target(tmp: Path, manifest: dict, files: list[str], graph_model, target, request: ConvertRequest, profiles, timings) -> TargetReport:
    """Memory fit, then an engine (GPU here) or a device bundle."""
    from graph_passes.apply import initializer_bytes
    from targets.bundle import write_bundle
    from targets.memory import memory_fit
    from targets.tensorrt_backend import build_engine, gpu_available

    batch, context = _target_limits(request, target)
    fit = memory_fit(manifest, initializer_bytes(graph_model.graph), target, batch, context)
    manifest["target_build"] = {
        "target": target.name,
        "tensorrt": target.tensorrt,
        "gpu_arch": target.gpu_arch,
        "profiles": [{"name": p.name, "shapes": {k: dataclasses.asdict(v) for k, v in p.shapes.items()}} for p in profiles],
        "memory": fit.to_json(),
    }
    bundle = engine = None
    if target.builds_on_device or not gpu_available():
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        with step(f"writing the device bundle for {target.name} (TensorRT {target.tensorrt})", timings, "bundle"):
            bundle = write_bundle(tmp, files, target, profiles)
            shutil.copy2(tmp / MANIFEST_NAME, bundle / MANIFEST_NAME)
    else:
        with step(f"building the TensorRT engine for {target.name}", timings, "engine"):
            engine = build_engine(tmp / "model.onnx", tmp, profiles, target.workspace_mib)
        manifest["files"].update(artifact_hashes(tmp, [engine.name]))
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return TargetReport(fit, bundle, engine, request.max_context is not None)


def check_directory(out_dir: Path, hf_model, tokenizer, decode_steps: int, timings: dict | None = None, backend: str = "ort") -> ParityReport:
    """Run parity on an OUT directory, write parity.json and the manifest's summary."""
    from sa_export.manifest import verify_artifacts
    from sa_export.parity import run_parity
    from sa_export.runtime import open_model

    manifest = read_manifest(out_dir)
    verify_artifacts(out_dir, manifest)
    plan = SharingPlan.from_json(manifest["plan"])
    tolerance = TOLERANCES[manifest["precision"]]
    runtime = "TensorRT" if backend == "trt" else "ONNX Runtime"
    with step(f"parity: {runtime} {manifest['precision']} vs PyTorch SA reference ({decode_steps} decode steps)", timings, "check"):
        report = run_parity(open_model(out_dir, backend), hf_model, plan, tokenizer, decode_steps, tolerance)
    write_json_atomic(out_dir / PARITY_NAME, report.to_json())
    manifest["parity"] = report.summary_json()
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return report


def reference_for(out_dir: Path, override: str | None) -> ModelSource:
    """The PyTorch model an OUT directory is checked against: --reference, else the manifest's source."""
    if override is not None:
        return resolve_model(override)
    return manifest_source(read_manifest(out_dir))


def manifest_source(manifest: dict) -> ModelSource:
    src = manifest["source"]
    if src.get("reference"):
        return resolve_model(src["reference"])
    if src["kind"] == "hf":
        path = Path(src["path"])
        if src["model"] in ALIASES:
            return resolve_model(src["model"])
        if path.is_dir():
            return ModelSource("hf", path, src["model"])
        raise UsageError(f"source model {path} recorded in the manifest is gone; pass --reference HF_DIR")
    raise UsageError("this model was converted from ONNX without a reference; pass --reference HF_DIR")


def check(
    out_dir: Path, reference: str | None = None, decode_steps: int = 32, allow_pickle: bool = False, backend: str = "ort",
    accept_unknown_config_keys: bool = False,
) -> ParityReport:
    if backend == "trt":
        from targets.tensorrt_backend import TRTModel

        TRTModel(out_dir)  # missing TensorRT or engine: say so before loading PyTorch
    source = reference_for(out_dir, reference)
    load_config(source, accept_unknown_config_keys or bool(read_manifest(out_dir)["source"].get("accepted_unknown_config_keys")))
    hf_model, tokenizer = load_reference(source, allow_pickle)
    return check_directory(Path(out_dir), hf_model, tokenizer, decode_steps, backend=backend)


def _export_graph(source: ModelSource, fp32_eager_model, request: ConvertRequest, export_dir: Path) -> ir.Model:
    """Export in the request's precision and exporter; reuses the fp32 eager model when that is what it needs."""
    if request.exporter == "genai":
        graph_model = load_onnx(export_genai(source.path, export_dir, request.precision))
        _fix_cache_head_dim(graph_model.graph, load_config(source, request.accept_unknown_config_keys))
        return graph_model
    attention = attention_for_export(request.exporter, request.opset)
    if fp32_eager_model is not None and request.precision == "fp32" and attention == "eager":
        model = fp32_eager_model
    else:
        model = load_hf_model(source, request.allow_pickle, half=request.precision == "fp16", attention=attention)
    return load_onnx(export_model(model, export_dir, request.exporter, request.opset))


def _has_sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True) and window < (getattr(config, "max_position_embeddings", None) or window + 1)


def _fix_cache_head_dim(graph: ir.Graph, config) -> None:
    """The builder leaves the cache's head_dim symbolic; the manifest and runtime need the number."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for value in [*graph.inputs, *graph.outputs]:
        if value.name.startswith(("past_key_values.", "present.")) and value.shape is not None and len(value.shape) == 4:
            value.shape = ir.Shape([*value.shape[:3], head_dim])


def export_description(exporter: str, precision: str, opset: int | None) -> str:
    if exporter == "genai":
        return f"onnxruntime-genai's model builder ({precision}, GroupQueryAttention, shared past/present buffer)"
    return f"torch.onnx dynamo ({precision}, opset {opset or DEFAULT_OPSET})"


def build_baseline(manifest: dict, target: Path, exporter: str | None = None) -> None:
    """The OUT directory's source without sharing (its own exporter unless one is given): what `bench` compares against."""
    from graph_passes.unfuse_attention import UnfuseAttentionPass

    source = manifest_source(manifest)
    accepted = bool(manifest["source"].get("accepted_unknown_config_keys"))
    config = load_config(source, accepted)
    precision = manifest["precision"]
    exporter = exporter or same_family_exporter(manifest)
    opset = manifest.get("opset") if exporter == "dynamo" else None
    request = ConvertRequest(
        model=source.name, spans=(), out=target, precision=precision, exporter=exporter, opset=opset, accept_unknown_config_keys=accepted
    )
    with atomic_directory(target, overwrite=True) as tmp:
        with step(f"building the baseline: {source.name} without sharing, {export_description(exporter, precision, opset)}"):
            graph_model = _export_graph(source, None, request, tmp / "export")
            UnfuseAttentionPass()(graph_model)  # the same graph family as the SA model
            if precision == "fp16":
                Fp32SoftmaxPass()(graph_model)
            files = save_onnx(graph_model, tmp)
            shutil.rmtree(tmp / "export", ignore_errors=True)
            plan = SharingPlan(config.num_hidden_layers, {})
            write_json_atomic(tmp / MANIFEST_NAME, build_manifest(source, config, plan, graph_model.graph, files, tmp, request))


def same_family_exporter(manifest: dict) -> str:
    """The manifest's exporter; models from a removed exporter get the default, which makes the same graph family."""
    exporter = manifest.get("exporter", DEFAULT_EXPORTER)
    return DEFAULT_EXPORTER if exporter in REMOVED_EXPORTERS else exporter


def build_engine_for(out_dir: Path) -> Path:
    """`build-engine`: the two-profile engine for OUT's target, built here."""
    from targets.profiles import get_target
    from targets.shapes import Profile, ShapeRange
    from targets.tensorrt_backend import build_engine

    manifest = read_manifest(out_dir)
    build = manifest.get("target_build")
    if build is None:
        raise UsageError(f"{out_dir} was converted for target {manifest['target']}, which has no TensorRT build; convert with --target")
    profiles = [
        Profile(p["name"], {k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in p["shapes"].items()})
        for p in build["profiles"]
    ]
    with step(f"building the TensorRT engine for {build['target']}"):
        engine = build_engine(Path(out_dir) / manifest["model_file"], Path(out_dir), profiles, get_target(build["target"]).workspace_mib)
    manifest["files"].update(artifact_hashes(Path(out_dir), [engine.name]))
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)
    return engine


def raise_on_failure(report: ParityReport | None, target: TargetReport | None = None) -> None:
    if report is not None and not report.passed:
        raise ParityError(report)
    if target is not None and target.max_context_requested and not target.fits:
        fit = target.memory
        raise CheckFailed(
            f"batch {fit.batch} x {fit.context} tokens does not fit {fit.target} even with SA; "
            f"the largest context that fits is {fit.max_context(fit.kv_per_token_sa):,} tokens"
        )


__all__ = ["ConvertRequest", "ConvertResult", "check", "convert", "raise_on_failure", "console"]

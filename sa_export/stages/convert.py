"""`convert`: export, rewrite, save atomically, check, then the target's engine or bundle."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from graph_passes import RewriteReport, apply_sharing_plan, cache_layers
from sa_export.accuracy.compare import ParityReport
from sa_export.accuracy.texts import calib_paths
from sa_export.core.atomic import atomic_directory, refuse_existing, refuse_to_replace
from sa_export.core.errors import UsageError
from sa_export.core.manifest import MANIFEST_NAME, Manifest
from sa_export.core.architectures import ModelShape
from sa_export.core.plan import SharingPlan, build_plan, kv_groups_in
from sa_export.core.progress import console, step
from sa_export.export import AUTO, DEFAULT_EXPORTER as DYNAMO, Exporter, ExportOptions, choose_exporter, get_exporter
from sa_export.export.cache import export_graph
from sa_export.export.onnx_io import load_onnx, save_onnx
from sa_export.hf.models import ModelSource, load_config, load_reference, resolve_model
from sa_export.stages.check import check_directory
from sa_export.stages.describe import cache_precision, describe, source_info
from sa_export.stages.target import TargetReport, prepare_target, target_profiles
from targets.profiles import TargetProfile, get_target

SAMPLE_PROMPT = "The capital of France is"


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
    fit_steps: int | None = None  # --head-map fit's distillation steps (None: its default)
    lora_rank: int = 0  # with --head-map fit: LoRA corrections of the shared layers, folded before export
    calib_file: str | None = None
    calib_tokens: int | None = None  # None: texts.calib_tokens_for's default
    max_batch: int | None = None  # None: the target's
    max_context: int | None = None  # None: the target's; given: exit 1 when it does not fit
    exporter: str = AUTO  # the fastest graph the target and model allow
    opset: int | None = None
    accept_unknown_config_keys: bool = False
    unshared: bool = False  # the same pipeline without sharing: the baseline engine of gpu-check
    export_cache: bool = True  # reuse the graph exported before for this model (export.cache)

    def export_options(self) -> ExportOptions:
        return ExportOptions(self.precision or "fp32", self.opset, self.allow_pickle, self.accept_unknown_config_keys)


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    out: Path
    plan: SharingPlan
    rewrite: RewriteReport
    manifest: Manifest
    parity: ParityReport | None
    timings: dict[str, float]
    sample: str | None
    target: TargetReport | None = None

    def summary_json(self) -> dict:
        return {
            "out": str(self.out),
            "shared_layers": list(self.plan.shared_layers),
            "shared_groups": {str(k): list(v) for k, v in self.plan.shared_groups.items()},  # partly shared layers' KV groups
            "anchors": {str(k): v for k, v in self.plan.anchors.items()},
            "kv_cache": dataclasses.asdict(self.manifest.cache.savings),
            "weight_bytes_removed": self.rewrite.weight_bytes_removed,
            "corrections": (self.manifest.head_map or {}).get("corrections"),
            "parity": self.parity.summary_json() if self.parity else None,
            "timings_s": self.timings,
            "sample": self.sample,
        }

    def lines(self) -> list[str]:
        """What `convert` prints."""
        savings = self.manifest.cache.savings
        lines = [
            f"{self.out}",
            f"  shared layers     {self.plan.describe()}",
            f"  KV cache          {savings.bytes_per_token_sa:,} B/token (was {savings.bytes_per_token_base:,}; "
            f"saves {savings.bytes_per_token_saved:,} B/token, {100 * savings.fraction_saved:.1f}%)",
            f"  weights removed   {self.rewrite.weight_bytes_removed:,} bytes (Q/K projections of shared layers)",
            f"  nodes             {self.rewrite.nodes_before:,} -> {self.rewrite.nodes_after:,}",
            f"  {self.parity.summary_line()}" if self.parity else "  parity            not checked (--no-check)",
        ]
        corrections = (self.manifest.head_map or {}).get("corrections")
        if corrections:
            lines.insert(-1, f"  corrections       rank {corrections['rank']} on {len(corrections['corrects'])} projections, "
                             f"folded into the weights ({corrections['file']})")
        if self.target is not None:
            lines += [f"  {line}" for line in self.target.lines(self.out)]
        if self.sample is not None:
            lines.append(f"  sample            {self.sample!r}")
        lines.append(f"  time              {conversion_times(self.timings)}")
        return lines


def conversion_times(timings: dict[str, float]) -> str:
    """Export, passes (with their share of the export) and check, then the total."""
    parts = []
    if "export" in timings:
        parts.append(f"export {timings['export']:.1f} s")
    if "export_reused" in timings:  # export.cache: the passes' share of it would mean nothing
        parts.append(f"export reused ({timings['export_reused']:.1f} s)")
    if "passes" in timings:
        share = f" ({100 * timings['passes'] / timings['export']:.1f}% of export)" if timings.get("export") else ""
        parts.append(f"passes {timings['passes']:.2f} s{share}")
    if "check" in timings:
        parts.append(f"check {timings['check']:.1f} s")
    parts.append(f"total {timings.get('total', 0):.1f} s")
    return ", ".join(parts)


def reference_source(request: ConvertRequest, source: ModelSource) -> ModelSource | None:
    if source.kind == "hf":
        if request.reference is not None:
            raise UsageError("--reference is the PyTorch model of an ONNX input; a Hugging Face MODEL is its own reference")
        return source
    if request.reference is None:
        return None
    reference = resolve_model(request.reference)
    if reference.kind != "hf":
        raise UsageError(f"--reference {request.reference!r} must be a Hugging Face model directory or alias")
    return reference


@dataclasses.dataclass(frozen=True)
class _Validated:
    """A request checked against its model, target and exporter, before anything heavy runs."""

    request: ConvertRequest
    source: ModelSource
    reference: ModelSource | None
    config: object
    target: TargetProfile
    exporter: Exporter
    why: str | None = None


def validate(request: ConvertRequest) -> _Validated:
    refuse_existing(Path(request.out), request.overwrite)
    if request.unshared and request.spans:
        raise UsageError("an unshared conversion takes no --span")
    kv_groups_in(request.spans)  # fails on a malformed span early
    source = resolve_model(request.model)
    reference = reference_source(request, source)
    inputs = (source.path, reference and reference.path, *calib_paths(request.calib_file))
    refuse_to_replace(Path(request.out), request.overwrite, MANIFEST_NAME, inputs)
    if source.kind == "onnx" and reference is None and request.check:
        raise UsageError("checking an ONNX input needs its PyTorch model: pass --reference HF_DIR (or --no-check)")
    if request.lora_rank and request.head_map != "fit":
        raise UsageError(f"--lora-rank corrections are fitted with the head maps by distillation: add --head-map fit (got {request.head_map})")
    if request.lora_rank and source.kind != "hf":
        raise UsageError("--lora-rank folds its corrections into the weights before export: convert the Hugging Face model, not an ONNX graph")
    if source.kind == "onnx" and reference is None and request.head_map != "identity":
        raise UsageError(f"--head-map {request.head_map} calibrates on the PyTorch model: pass --reference HF_DIR")
    config = load_config(reference, request.accept_unknown_config_keys) if reference is not None else None
    target = get_target(request.target)
    precision = request.precision or target.default_precision
    if precision not in target.precisions:
        raise UsageError(f"target {target.name} does not take --precision {precision}; it takes {', '.join(target.precisions)}")
    why = None  # the reason of an automatic choice, said when the export starts
    if request.exporter == AUTO and (source.kind != "hf" or request.opset is not None):
        exporter = get_exporter(DYNAMO)  # an ONNX input is not exported; --opset asks for the dynamo export
        why = f"--opset {request.opset} is an option of the dynamo export" if source.kind == "hf" else None
    elif request.exporter == AUTO:
        exporter, why = choose_exporter(config, target, source, precision)
    else:
        exporter = get_exporter(request.exporter)
    exporter.refuse(config, target, source.kind)
    if precision not in exporter.precisions:
        raise UsageError(f"--exporter {exporter.name} builds {', '.join(exporter.precisions)} graphs; got --precision {precision}")
    request = dataclasses.replace(request, precision=precision, target=target.name, exporter=exporter.name, opset=exporter.resolve_opset(request.opset))
    return _Validated(request, source, reference, config, target, exporter, why)


def convert(request: ConvertRequest) -> ConvertResult:
    job = validate(request)
    request, source, reference, config, target = job.request, job.source, job.reference, job.config, job.target
    out = Path(request.out)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if source.kind == "onnx":
        graph_model = load_onnx(source.path)
        num_layers = len(cache_layers(graph_model.graph))
        if request.precision != cache_precision(graph_model.graph):
            raise UsageError(f"--precision {request.precision} needs an ONNX export in that precision, or convert the Hugging Face model instead")
    else:
        graph_model = None
        num_layers = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None) if config is not None else None
    if request.unshared:
        plan = SharingPlan(num_layers, {})
    else:
        head_groups = ModelShape.from_config(config).head_groups if config is not None else {}
        plan = build_plan(list(request.spans), num_layers, request.anchors, kinds, request.force, **head_groups)
    if config is not None and config.num_hidden_layers != num_layers:
        raise UsageError(f"--reference has {config.num_hidden_layers} layers but the ONNX graph has {num_layers}")

    hf_model = tokenizer = None
    with atomic_directory(out, request.overwrite, lambda: _output_estimate(reference or source, 3 if request.lora_rank else 2)) as tmp:
        if reference is not None:
            hf_model, tokenizer = load_reference(reference, request.allow_pickle, timings)
        calibration = corrections = None
        if request.head_map != "identity":
            plan, calibration, corrections = _calibrate(hf_model, tokenizer, plan, request, reference, kinds, tmp)
        options = request.export_options()
        if graph_model is None:
            if job.why:
                console.print(f"[green]✓[/green] exporter {job.exporter.name}: {job.why}", soft_wrap=True)
            exported = reference
            if corrections is not None:  # the exporters read checkpoints: give them the corrected one
                with step("writing the corrected checkpoint for the exporter", timings, "corrected_checkpoint"):
                    from sa_export.accuracy.adapters import save_corrected_checkpoint

                    exported = save_corrected_checkpoint(hf_model, tokenizer, tmp / "corrected", reference.name)
            # A corrected checkpoint is new with every fit: its export is not kept.
            use_cache = request.export_cache and corrections is None
            graph_model = export_graph(job.exporter, exported, options, tmp / "export", hf_model, use_cache, timings)
            shutil.rmtree(tmp / "corrected", ignore_errors=True)
        in_place = target.writes_caches_in_place
        what = plan.describe() + ("; caches written in place (TensorScatter)" if in_place else "")
        with step(f"rewriting the graph: {what}", timings, "passes"):
            rewrite = apply_sharing_plan(graph_model, plan, request.precision, in_place)
        with step("saving model.onnx", timings, "save"):
            files = save_onnx(graph_model, tmp)
            shutil.rmtree(tmp / "export", ignore_errors=True)
            if corrections is not None:
                files.append(corrections["file"])
            if tokenizer is not None:
                before = set(p.name for p in tmp.iterdir())
                tokenizer.save_pretrained(tmp)
                files += sorted(set(p.name for p in tmp.iterdir()) - before)
        info = source_info(source, config, reference, request.reference, request.accept_unknown_config_keys)
        head_map = {"mode": request.head_map, "calibration": calibration.to_json() if calibration else None}
        if request.head_map == "fit":
            head_map["fit_steps"] = _fit_steps(request)
        if corrections is not None:
            head_map["corrections"] = corrections
        if request.head_map == "calibrated":
            from sa_export.accuracy.calibration import CALIBRATED_DEFAULT

            head_map["method"] = CALIBRATED_DEFAULT  # what calibrated meant for this model: it has changed before
        capacity = None
        if in_place:  # the buffers hold the planned context, never more than the model's positions
            limit = getattr(config, "max_position_embeddings", None) if config is not None else None
            capacity = min(request.max_context or target.max_context, limit or (1 << 62))
        manifest = describe(graph_model.graph, plan, info, config, files, tmp, request.precision, target.name, job.exporter.name, head_map, capacity)
        manifest.write(tmp)
        # A graph the target's TensorRT cannot take fails before the (longer) parity check.
        profiles = target_profiles(manifest, graph_model, target, request.max_batch, request.max_context) if target.uses_tensorrt else None

        parity = None
        if request.check:
            parity, manifest = check_directory(tmp, hf_model, tokenizer, request.decode_steps, timings, manifest=manifest)
        target_report = None
        if profiles is not None:
            target_report, manifest = prepare_target(tmp, manifest, files, graph_model, target, request.max_batch, request.max_context, profiles, timings)
        sample = None
        if tokenizer is not None:
            from sa_export.runtime import SAModel

            with step("sample generation", timings, "generate"):
                sample = SAMPLE_PROMPT + "".join(SAModel(tmp).generate(SAMPLE_PROMPT, max_new_tokens=20))
        timings["total"] = round(time.perf_counter() - started, 3)
    return ConvertResult(out.absolute(), plan, rewrite, manifest, parity, timings, sample, target_report)


def _output_estimate(source: ModelSource, copies: int = 2) -> int:
    """Bytes a convert writes at its peak: the export and the saved model side by side (and
    with corrections, the corrected checkpoint), each about the size of the source's weights."""
    root = source.path if source.path.is_dir() else source.path.parent
    weights = sum(p.stat().st_size for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".onnx", ".data", ".gguf"))
    return copies * weights


def _calibrate(hf_model, tokenizer, plan: SharingPlan, request: ConvertRequest, reference: ModelSource, kinds, tmp: Path):
    """Head maps fitted on calibration text (unless --calib, the tail of the default text, and
    with --lora-rank that of the other-domain text too: ``texts.calib_files_for``).

    With --lora-rank, the corrections fitted with them are folded into ``hf_model`` (the
    reference from then on) and saved in ``tmp``; the third value is the manifest's record
    of them (None without)."""
    if tokenizer is None:
        raise UsageError(f"--head-map {request.head_map} calibrates on text, and {reference.name} has no tokenizer; use --head-map identity")
    from sa_export.accuracy.evaluate import calibrated_plan
    from sa_export.accuracy.texts import calib_files_for, calib_tokens_for, split_texts

    files = calib_files_for(request.calib_file, request.lora_rank)
    _, calibration = split_texts(tokenizer, None, files, 0, calib_tokens_for(request.calib_tokens, request.lora_rank))
    adapters = None
    if request.lora_rank and plan.anchors:
        from sa_export.accuracy.adapters import LowRankAdapters

        adapters = LowRankAdapters(hf_model, plan.shared_layers, request.lora_rank)
    plan = calibrated_plan(hf_model, plan, request.head_map, calibration, kinds, fit_steps=_fit_steps(request), adapters=adapters)
    if adapters is None:
        return plan, calibration, None
    from sa_export.accuracy.adapters import CORRECTIONS_NAME

    adapters.fold(hf_model)
    return plan, calibration, adapters.save(tmp / CORRECTIONS_NAME)


def _fit_steps(request: ConvertRequest) -> int:
    from sa_export.accuracy.distill import default_fit_steps  # torch: imported once a request needs it

    return request.fit_steps or default_fit_steps(bool(request.lora_rank))

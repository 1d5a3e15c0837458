"""`check`: an OUT directory against the PyTorch SA reference; parity.json and the manifest's summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sa_export.accuracy.compare import FP32_TOLERANCE, QUANTIZED_PRECISIONS, TOLERANCES, ParityReport
from sa_export.core.atomic import write_json_atomic
from sa_export.core.errors import CheckFailed, ParityError, UsageError
from sa_export.core.manifest import Manifest
from sa_export.core.progress import step
from sa_export.hf.models import ALIASES, ModelSource, load_config, load_reference, resolve_model

PARITY_NAME = "parity.json"


def check_directory(
    out_dir: Path, hf_model, tokenizer, decode_steps: int, timings: dict | None = None, backend: str = "ort",
    prefill_chunk: int | None = None, manifest: Manifest | None = None,
) -> tuple[ParityReport, Manifest]:
    """Run parity on an OUT directory, write parity.json and the manifest's summary.

    ``manifest``: the one the caller has just written, or read and verified; by default it
    is read and its artifacts verified here.
    """
    from sa_export.accuracy.parity import run_parity
    from sa_export.runtime import open_model

    if manifest is None:
        manifest = Manifest.read(out_dir)
        manifest.verify_artifacts(out_dir)
    tolerance = TOLERANCES[manifest.precision]
    if manifest.precision in QUANTIZED_PRECISIONS:
        from sa_export.accuracy.quantized import load_graph_weights
        from sa_export.export.onnx_io import load_onnx

        graph_file = Path(out_dir) / manifest.model_file
        with step(f"reference weights: the {manifest.precision} graph's own, dequantized", timings, "dequantize"):
            load_graph_weights(hf_model, load_onnx(graph_file).graph, manifest.plan, graph_file)
    runtime = "TensorRT" if backend == "trt" else "ONNX Runtime"
    with step(f"parity: {runtime} {manifest.precision} vs PyTorch SA reference ({decode_steps} decode steps)", timings, "check"):
        report = run_parity(open_model(out_dir, backend), hf_model, manifest.plan, tokenizer, decode_steps, tolerance, prefill_chunk=prefill_chunk)
    if manifest.precision in QUANTIZED_PRECISIONS and backend == "ort":
        from sa_export.accuracy.quantized import exact_arithmetic_graph
        from sa_export.runtime import SAModel

        with step("parity of the same graph with fp32 accumulation (MatMulNBits accuracy_level 1)", timings, "check_exact"):
            exact_model = SAModel(out_dir, graph=exact_arithmetic_graph(Path(out_dir) / manifest.model_file))
            exact = run_parity(exact_model, hf_model, manifest.plan, tokenizer, decode_steps, FP32_TOLERANCE, prefill_chunk=prefill_chunk)
        report = dataclasses.replace(report, exact=exact)
    write_json_atomic(Path(out_dir) / PARITY_NAME, report.to_json())
    manifest = manifest.replace(parity=report.summary_json())
    manifest.write(out_dir)
    return report, manifest


def manifest_source(manifest: Manifest) -> ModelSource:
    """The PyTorch model a manifest's graph was made from (or checked against)."""
    src = manifest.source
    if src.reference:
        return resolve_model(src.reference)
    if src.kind == "hf":
        path = Path(src.path)
        if src.model in ALIASES:
            return resolve_model(src.model)
        if path.is_dir():
            return ModelSource("hf", path, src.model)
        raise UsageError(f"source model {path} recorded in the manifest is gone; pass --reference HF_DIR")
    raise UsageError("this model was converted from ONNX without a reference; pass --reference HF_DIR")


def check(
    out_dir: Path, reference: str | None = None, decode_steps: int = 32, allow_pickle: bool = False, backend: str = "ort",
    accept_unknown_config_keys: bool = False, prefill_chunk: int | None = None,
) -> ParityReport:
    if backend == "trt":
        from sa_export.runtime.tensorrt_backend import TRTModel

        TRTModel(out_dir)  # missing TensorRT or engine: say so before loading PyTorch
    manifest = Manifest.read(out_dir)
    manifest.verify_artifacts(out_dir)  # before PyTorch loads
    source = resolve_model(reference) if reference is not None else manifest_source(manifest)
    load_config(source, accept_unknown_config_keys or bool(manifest.source.accepted_unknown_config_keys))
    hf_model, tokenizer = load_reference(source, allow_pickle)
    corrections = (manifest.head_map or {}).get("corrections")
    if corrections:  # the reference is the user's model with the corrections the graph holds
        from sa_export.accuracy.adapters import fold_saved_corrections

        fold_saved_corrections(hf_model, out_dir, corrections)
    report, _ = check_directory(Path(out_dir), hf_model, tokenizer, decode_steps, backend=backend, prefill_chunk=prefill_chunk, manifest=manifest)
    return report


def raise_on_failure(report: ParityReport | None, target=None) -> None:
    """Exit 1 (CheckFailed) when parity failed, or when a requested context does not fit the target."""
    if report is not None and not report.passed:
        raise ParityError(report)
    if target is not None and target.max_context_requested and not target.fits:
        fit = target.memory
        raise CheckFailed(
            f"batch {fit.batch} x {fit.context} tokens does not fit {fit.target} even with SA; "
            f"the largest context that fits is {fit.max_context(sa=True):,} tokens"
        )

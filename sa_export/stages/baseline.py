"""The unshared model a `bench` compares against: the same source, exporter family and pass sequence."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import graph_passes
from graph_passes import apply_sharing_plan
from sa_export.core.atomic import atomic_directory
from sa_export.core.manifest import Manifest
from sa_export.core.plan import SharingPlan
from sa_export.core.progress import console, step
from sa_export.export import Exporter, ExportOptions
from sa_export.export.cache import export_graph, export_key, source_digests
from sa_export.export.onnx_io import save_onnx
from sa_export.hf.models import load_config
from sa_export.stages.check import manifest_source
from sa_export.stages.describe import describe, source_info


# The code that turns an export into the baseline: a change to it is a new baseline.
_PASS_CODE = (Path(graph_passes.__file__).parent, Path(__file__))


def _baseline_options(manifest: Manifest, exporter: Exporter) -> ExportOptions:
    accepted = bool(manifest.source.accepted_unknown_config_keys)
    # The SA model's own opset when the baseline uses its exporter and that exporter takes one.
    same = exporter.name == manifest.exporter and exporter.default_opset() is not None
    opset = exporter.resolve_opset(manifest.opset if same else None)
    return ExportOptions(manifest.precision, opset, accept_unknown_config_keys=accepted)


def baseline_key(manifest: Manifest, exporter: Exporter) -> str:
    """What the baseline is built from: the export's key (the model files' content, the
    exporter and its options, the versions of the packages that export, sa-export's export
    code) and the source of the passes that rewrite it, so that no upgrade or change of
    either leaves a bench comparing with a baseline the code would no longer build."""
    export = export_key(manifest_source(manifest), exporter, _baseline_options(manifest, exporter))
    return hashlib.sha256(json.dumps([export, source_digests(_PASS_CODE)]).encode()).hexdigest()[:32]


def build_baseline(manifest: Manifest, target: Path, exporter: Exporter) -> None:
    """OUT's source without sharing, through ``exporter`` and the same pass sequence as convert."""
    source = manifest_source(manifest)
    options = _baseline_options(manifest, exporter)
    accepted = options.accept_unknown_config_keys
    config = load_config(source, accepted)
    plan = SharingPlan(config.num_hidden_layers, {})
    with atomic_directory(target, overwrite=True) as tmp:
        console.print(f"building the baseline: {source.name} without sharing, {exporter.describe(options)}", soft_wrap=True)
        graph_model = export_graph(exporter, source, options, tmp / "export")
        with step("rewriting and saving the baseline"):
            apply_sharing_plan(graph_model, plan, manifest.precision)  # the same graph family as the SA model
            files = save_onnx(graph_model, tmp)
            shutil.rmtree(tmp / "export", ignore_errors=True)
            info = source_info(source, config, source, None, accepted)
            describe(graph_model.graph, plan, info, config, files, tmp, manifest.precision, "cpu", exporter.name).write(tmp)

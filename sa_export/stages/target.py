"""The TensorRT side of `convert` and `build-engine`: compatibility, memory fit, engine or device bundle."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from graph_passes import initializer_bytes
from sa_export.core.errors import UsageError
from sa_export.core.manifest import MANIFEST_NAME, Manifest
from sa_export.core.progress import step
from targets.profiles import TargetProfile, get_target
from targets.shapes import Profile, profile_from_json, profile_to_json


@dataclasses.dataclass(frozen=True)
class TargetReport:
    memory: object  # targets.memory.MemoryFit
    bundle: Path | None
    engine: Path | None
    max_context_requested: bool

    @property
    def fits(self) -> bool:
        return self.memory.fits_sa

    def lines(self, out: Path) -> list[str]:
        lines = list(self.memory.lines())
        if self.engine is not None:
            lines.append(f"engine            {out / self.engine.name}")
        if self.bundle is not None:
            lines.append(f"device bundle     {out / self.bundle.name} (run build_engine.sh on the device, or `sa-export build-engine {out}`)")
        return lines


def target_limits(target: TargetProfile, max_batch: int | None, max_context: int | None) -> tuple[int, int]:
    """Batch and context to plan for: the request's, else the target's defaults."""
    return max_batch or target.max_batch, max_context or target.max_context


def target_profiles(manifest: Manifest, graph_model, target: TargetProfile, max_batch: int | None, max_context: int | None) -> list[Profile]:
    """Optimization profiles for the target, after checking that its TensorRT takes the graph."""
    from targets.compat import check_compatibility, raise_if_incompatible
    from targets.shapes import profiles_for

    if manifest.model is None:
        raise UsageError("memory fit for a TensorRT target needs the model's config: pass --reference HF_DIR")
    batch, context = target_limits(target, max_batch, max_context)
    profiles = profiles_for(manifest, batch, context, min(target.max_prefill, context))
    raise_if_incompatible(check_compatibility(graph_model, target, profiles))
    return profiles


def prepare_target(
    tmp: Path, manifest: Manifest, files: list[str], graph_model, target: TargetProfile, max_batch: int | None,
    max_context: int | None, profiles: list[Profile], timings: dict,
) -> tuple[TargetReport, Manifest]:
    """Memory fit, then an engine (GPU here) or a device bundle."""
    from targets.bundle import write_bundle
    from targets.engine import build_engine, gpu_available
    from targets.memory import memory_fit

    batch, context = target_limits(target, max_batch, max_context)
    fit = memory_fit(manifest, initializer_bytes(graph_model.graph), target, batch, context)
    manifest = manifest.replace(
        target_build={
            "target": target.name,
            "tensorrt": target.tensorrt,
            "gpu_arch": target.gpu_arch,
            "profiles": [profile_to_json(p) for p in profiles],
            "memory": fit.to_json(),
        }
    )
    bundle = engine = None
    if target.builds_on_device or not gpu_available():
        manifest.write(tmp)
        with step(f"writing the device bundle for {target.name} (TensorRT {target.tensorrt})", timings, "bundle"):
            bundle = write_bundle(tmp, files, target, profiles)
            shutil.copy2(tmp / MANIFEST_NAME, bundle / MANIFEST_NAME)
    else:
        with step(f"building the TensorRT engine for {target.name}", timings, "engine"):
            engine = build_engine(tmp / manifest.model_file, tmp, profiles, target.workspace_mib)
        manifest = manifest.with_files(tmp, [engine.name])
        manifest.write(tmp)
    return TargetReport(fit, bundle, engine, max_context is not None), manifest


def build_engine_for(out_dir: Path) -> Path:
    """`build-engine`: the two-profile engine for OUT's target, built here."""
    from targets.engine import build_engine

    out_dir = Path(out_dir)
    manifest = Manifest.read(out_dir)
    build = manifest.target_build
    if build is None:
        raise UsageError(f"{out_dir} was converted for target {manifest.target}, which has no TensorRT build; convert with --target")
    profiles = [profile_from_json(p) for p in build["profiles"]]
    with step(f"building the TensorRT engine for {build['target']}"):
        engine = build_engine(out_dir / manifest.model_file, out_dir, profiles, get_target(build["target"]).workspace_mib)
    manifest.with_files(out_dir, [engine.name]).write(out_dir)
    return engine

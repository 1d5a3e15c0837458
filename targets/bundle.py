"""The device bundle: everything needed to build the engine on the target itself.

Jetson engines must be built on the Jetson (engines are tied to the GPU and the
TensorRT version). OUT/bundle/ holds the ONNX model and its data, the manifest, the
optimization profiles as JSON and build_engine.sh with the trtexec command for the
target's TensorRT; `sa-export build-engine OUT` does the same build through the
Python API with one profile per regime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from pathlib import Path

from targets.compat import check_input_names
from targets.profiles import TargetProfile
from targets.shapes import Profile, covering_profile
from targets.engine import ENGINE_NAME, TIMING_CACHE_NAME

BUNDLE_DIR = "bundle"


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def shape_flag(profile: Profile, which: str) -> str:
    return ",".join(f"{name}:{_dims(getattr(r, which))}" for name, r in profile.shapes.items())


def trtexec_command(target: TargetProfile, profiles: list[Profile], model_file: str = "model.onnx") -> list[str]:
    """trtexec takes one optimization profile here: the union of the prefill and decode ranges."""
    check_input_names([n for p in profiles for n in p.shapes])
    profile = covering_profile(profiles)
    return [
        "trtexec",
        f"--onnx={model_file}",
        # Strongly typed: the ONNX types (fp16 with fp32 Softmax and norms) decide precision.
        "--stronglyTyped",
        f"--minShapes={shape_flag(profile, 'min')}",
        f"--optShapes={shape_flag(profile, 'opt')}",
        f"--maxShapes={shape_flag(profile, 'max')}",
        f"--memPoolSize=workspace:{target.workspace_mib}",
        f"--timingCacheFile={TIMING_CACHE_NAME}",
        f"--saveEngine={ENGINE_NAME}",
    ]


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # same filesystem: no second copy of the weights
    except OSError:
        shutil.copy2(source, destination)


def write_bundle(out_dir: Path, files: list[str], target: TargetProfile, profiles: list[Profile]) -> Path:
    bundle = out_dir / BUNDLE_DIR
    bundle.mkdir()
    for name in files:
        _link_or_copy(out_dir / name, bundle / name)
    (bundle / "profiles.json").write_text(
        json.dumps([{"name": p.name, "shapes": {k: dataclasses.asdict(v) for k, v in p.shapes.items()}} for p in profiles], indent=2)
    )
    command = " \\\n    ".join(shlex.quote(part) for part in trtexec_command(target, profiles))
    script = f"""#!/usr/bin/env bash
# Build the TensorRT engine for {target.name} ({target.description}) on the device itself.
# Expects TensorRT {target.tensorrt} (trtexec on PATH; on JetPack it is /usr/src/tensorrt/bin/trtexec).
# This engine has one optimization profile covering prefill and decode;
# `sa-export build-engine <OUT>` builds one profile per regime through the Python API.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:/usr/src/tensorrt/bin"
{command}
"""
    path = bundle / "build_engine.sh"
    path.write_text(script)
    path.chmod(0o755)
    return bundle

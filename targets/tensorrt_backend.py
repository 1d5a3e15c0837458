"""TensorRT engine building and running. The only module that imports tensorrt (lazily).

Building uses the TensorRT Python API: a strongly typed network (precision lives in
the ONNX types; TensorRT 11 accepts nothing else), one optimization profile per
regime (prefill, decode), a workspace limit and a timing cache. Running uses
Polygraphy's TrtRunner, selecting the profile that matches the step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from sa_export.errors import EngineBuildError, EnvironmentProblem
from sa_export.runtime import ManifestModel
from targets.shapes import Profile

ENGINE_NAME = "model.engine"
TIMING_CACHE_NAME = "timing.cache"
BUILD_LOG_NAME = "build.log"


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EnvironmentProblem("TensorRT is not installed: building and running engines needs an NVIDIA GPU with TensorRT (pip install tensorrt)") from None
    return trt


def gpu_available() -> bool:
    """True when tensorrt imports and a CUDA device answers."""
    try:
        trt = _tensorrt()
        return trt.Builder(trt.Logger(trt.Logger.ERROR)) is not None  # None or an error without a CUDA device
    except (EnvironmentProblem, RuntimeError, TypeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(onnx_path: Path, out_dir: Path, profiles: list[Profile], workspace_mib: int) -> Path:
    """Parse, build and save OUT/model.engine, OUT/timing.cache and OUT/build.log."""
    trt = _tensorrt()
    messages: list[str] = []

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            messages.append(f"[{severity.name}] {msg}")

    logger = _Logger()
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {'; '.join(errors[:5])}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        cache_path = out_dir / TIMING_CACHE_NAME
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        for profile in profiles:
            optimization = builder.create_optimization_profile()
            for name, shape in profile.shapes.items():
                optimization.set_shape(name, shape.min, shape.opt, shape.max)
            config.add_optimization_profile(optimization)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT failed to build the engine; see {out_dir / BUILD_LOG_NAME}")
        _write_atomic(out_dir / ENGINE_NAME, bytes(serialized))
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    finally:
        (out_dir / BUILD_LOG_NAME).write_text("\n".join(messages) + "\n")
    return out_dir / ENGINE_NAME


class TRTModel(ManifestModel):
    """The runtime interface of sa_export.runtime.SAModel, on a TensorRT engine."""

    backend = "tensorrt"

    def __init__(self, out_dir: str | Path):
        _tensorrt()
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise EnvironmentProblem("running engines needs Polygraphy: pip install 'sa-export[tensorrt]'") from None

        super().__init__(out_dir)
        engine_path = self.out_dir / ENGINE_NAME
        if not engine_path.is_file():
            raise EnvironmentProblem(f"{engine_path} is missing: build it on the target with `sa-export build-engine {self.out_dir}`")
        self.runner = TrtRunner(EngineFromBytes(engine_path.read_bytes()))
        self.runner.activate()
        self.profile = None

    def forward(self, input_ids, attention_mask, cache):
        past = next(iter(cache.values())).shape[2] if cache else 0
        profile = 0 if past == 0 else 1  # prefill, decode (targets.shapes order)
        if profile == 1 and input_ids.shape[1] != 1:
            raise EngineBuildError("the engine's decode profile takes one token per step after the prefill")
        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        feeds = self.feeds(input_ids, attention_mask, cache)
        outputs = {k: np.asarray(v) for k, v in self.runner.infer(feeds, copy_outputs_to_host=True).items()}
        return outputs["logits"], self.next_cache(outputs), outputs

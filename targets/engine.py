"""TensorRT engine building. With the runtime's TensorRT backend, the only code that imports tensorrt (lazily).

Building uses the TensorRT Python API: a strongly typed network (precision lives in
the ONNX types; TensorRT 11 accepts nothing else), one optimization profile per
regime (prefill, decode), a workspace limit and a timing cache.
"""

from __future__ import annotations

from pathlib import Path

from sa_export.core.atomic import write_bytes_atomic
from sa_export.core.errors import EngineBuildError, EnvironmentProblem
from targets.shapes import Profile

ENGINE_NAME = "model.engine"
TIMING_CACHE_NAME = "timing.cache"
BUILD_LOG_NAME = "build.log"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EnvironmentProblem("TensorRT is not installed: building and running engines needs an NVIDIA GPU with TensorRT (pip install tensorrt)") from None
    return trt


def gpu_available() -> bool:
    """True when tensorrt imports and a CUDA device answers."""
    try:
        trt = import_tensorrt()
        return trt.Builder(trt.Logger(trt.Logger.ERROR)) is not None  # None or an error without a CUDA device
    except (EnvironmentProblem, RuntimeError, TypeError):
        return False


def build_engine(onnx_path: Path, out_dir: Path, profiles: list[Profile], workspace_mib: int) -> Path:
    """Parse, build and save OUT/model.engine, OUT/timing.cache and OUT/build.log."""
    trt = import_tensorrt()
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
        write_bytes_atomic(out_dir / ENGINE_NAME, bytes(serialized))
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    finally:
        (out_dir / BUILD_LOG_NAME).write_text("\n".join(messages) + "\n")
    return out_dir / ENGINE_NAME

"""`gpu-check`: the proof of the TensorRT path on a machine with an NVIDIA GPU.

Builds the unshared and the SA engine of a model for a desktop target, checks both
engines against the PyTorch reference (TensorRT parity, the target's fp16 gate), and
times one decode step of each at several contexts, side by side, writing one JSON.

Decode timing runs the engine through TensorRT's execution context with every tensor
in device memory (no host copies): concat graphs read a past of ``context - 1``
positions and write a present of ``context``; in-place graphs bind each present to its
past's buffer of ``context`` positions, so TensorScatter writes the new row in place.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from sa_export.core.atomic import write_json_atomic
from sa_export.core.errors import EnvironmentProblem
from sa_export.core.manifest import Manifest
from sa_export.core.progress import step

DEFAULT_CONTEXTS = (512, 2048, 8192)


@dataclasses.dataclass(frozen=True)
class GpuCheckRequest:
    model: str = "smollm2-135m"
    spans: tuple[str, ...] = ("20-28",)
    target: str = "hopper"
    out: Path = Path("gpu-check")
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    steps: int = 50
    overwrite: bool = False


def _require_gpu() -> None:
    from targets.engine import gpu_available, import_tensorrt

    import_tensorrt()  # EnvironmentProblem (exit 3) without TensorRT
    if not gpu_available():
        raise EnvironmentProblem("gpu-check needs an NVIDIA GPU that TensorRT can use; none answered")


def _convert(request: GpuCheckRequest, name: str, unshared: bool):
    from sa_export.stages.convert import ConvertRequest, convert

    convert_request = ConvertRequest(
        model=request.model, spans=() if unshared else request.spans, out=request.out / name, target=request.target,
        max_context=max(request.contexts), overwrite=request.overwrite, unshared=unshared,
    )
    return convert(convert_request)


def decode_step_ms(out_dir: Path, context: int, steps: int) -> float:
    """Median time of one decode step at ``context`` positions, all tensors on the device."""
    from polygraphy import cuda

    from sa_export.runtime.base import NUMPY_DTYPES
    from targets.engine import ENGINE_NAME, import_tensorrt

    trt = import_tensorrt()
    manifest = Manifest.read(out_dir)
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine((Path(out_dir) / ENGINE_NAME).read_bytes())
    if engine is None:
        raise EnvironmentProblem(f"TensorRT could not load {Path(out_dir) / ENGINE_NAME} on this GPU")
    execution = engine.create_execution_context()
    stream = cuda.Stream()
    execution.set_optimization_profile_async(1, stream.ptr)  # decode (targets.shapes order)
    cache = manifest.cache
    in_place = cache.buffer == "shared"
    past_length = context if in_place else context - 1
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(0, manifest.model.vocab_size if manifest.model else 100, (1, 1)),
        "attention_mask": np.ones((1, context), np.int64),
        "position_ids": np.asarray([[context - 1]], np.int64),
    }
    buffers = []
    inputs = _input_names(engine, trt)
    for name, dtype in manifest.io.items():
        if name in host and name in inputs:
            array = cuda.DeviceArray(shape=host[name].shape, dtype=NUMPY_DTYPES[dtype])
            array.copy_from(np.ascontiguousarray(host[name].astype(NUMPY_DTYPES[dtype])), stream)
            execution.set_input_shape(name, host[name].shape)
            execution.set_tensor_address(name, array.ptr)
            buffers.append(array)
    for layer in manifest.layout:
        for past, present in layer.pairs():
            heads = cache.kv_heads_of(past)
            shape = (1, heads, past_length, cache.head_dim)
            past_buffer = cuda.DeviceArray(shape=shape, dtype=NUMPY_DTYPES[cache.dtype])
            execution.set_input_shape(past, shape)
            execution.set_tensor_address(past, past_buffer.ptr)
            buffers.append(past_buffer)
            if in_place:
                execution.set_tensor_address(present, past_buffer.ptr)  # the same buffer, written in place
            else:
                present_buffer = cuda.DeviceArray(shape=(1, heads, context, cache.head_dim), dtype=NUMPY_DTYPES[cache.dtype])
                execution.set_tensor_address(present, present_buffer.ptr)
                buffers.append(present_buffer)
    logits = cuda.DeviceArray(shape=(1, 1, manifest.model.vocab_size), dtype=NUMPY_DTYPES[manifest.io["logits"]])
    execution.set_tensor_address("logits", logits.ptr)
    buffers.append(logits)
    times = []
    for index in range(steps + 5):
        started = time.perf_counter()
        if not execution.execute_async_v3(stream.ptr):
            raise EnvironmentProblem(f"TensorRT could not run {out_dir} at context {context}")
        stream.synchronize()
        if index >= 5:  # warm-up steps
            times.append(1000 * (time.perf_counter() - started))
    for buffer in buffers:
        buffer.free()
    return statistics.median(times)


def _input_names(engine, trt) -> set[str]:
    return {engine.get_tensor_name(i) for i in range(engine.num_io_tensors) if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT}


def gpu_check(request: GpuCheckRequest) -> dict:
    """Engines, TensorRT parity and decode timings of the unshared and the SA model; writes OUT/gpu_check.json."""
    from sa_export.stages.check import check

    _require_gpu()
    report: dict = {"model": request.model, "spans": list(request.spans), "target": request.target, "contexts": list(request.contexts)}
    for name, unshared in (("base", True), ("sa", False)):
        result = _convert(request, name, unshared)  # builds the engine: a GPU is present
        parity = check(request.out / name, backend="trt")
        report[name] = {
            "dir": str(request.out / name),
            "ort_parity": result.parity.summary_json() if result.parity else None,
            "trt_parity": parity.summary_json(),
            "kv_bytes_per_token": result.manifest.cache.savings.bytes_per_token_sa,
        }
    rows = []
    for context in request.contexts:
        with step(f"decode step at {context} positions, base and SA ({request.steps} steps each)"):
            base = decode_step_ms(request.out / "base", context, request.steps)
            sa = decode_step_ms(request.out / "sa", context, request.steps)
        rows.append({"context": context, "t_base_ms": base, "t_sa_ms": sa, "time_ratio_sa_to_base": sa / base})
    report["decode"] = rows
    report["passed"] = bool(report["base"]["trt_parity"]["passed"] and report["sa"]["trt_parity"]["passed"])
    write_json_atomic(request.out / "gpu_check.json", report)
    return report

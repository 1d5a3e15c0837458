"""Graph passes at Llama-3-8B scale: pass time and peak RSS, whatever the weight bytes.

    python -m sa_export.benchmarks.scale [--dir DIR] [--layers 32] [--span 20-28] [--save]

Builds a decomposed-attention decoder graph with Llama-3-8B shapes (hidden 4096, 32
heads, 8 KV heads, head dim 128, intermediate 14336, vocab 128256) whose fp16 weights
live in one external data file (about 15 GiB for 32 layers, written as a sparse file
so that building it costs no disk bandwidth). A fresh process then loads the graph,
finds the attention blocks and applies the SA passes, and reports the pass time and
its own peak RSS. With --save it also saves the result with external data and
reports how many weight bytes the data file lost.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.initializers import add_initializer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 14336, 128256
DATA = "model.onnx.data"


class _Weights:
    """Hands out fp16 external tensors at increasing offsets of one data file."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.offset = 0

    def __call__(self, graph: ir.Graph, name: str, shape: tuple[int, ...]) -> ir.Value:
        length = int(np.prod(shape)) * 2
        tensor = ir.ExternalTensor(DATA, self.offset, length, ir.DataType.FLOAT16, shape=ir.Shape(shape), name=name, base_dir=self.directory)
        self.offset += length
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT16), const_value=tensor)
        graph.register_initializer(value)
        return value



def build(directory: Path, layers: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    f16 = ir.DataType.FLOAT16
    ids = ir.val("input_ids", ir.DataType.INT64, ["batch", "seq"])
    mask_in = ir.val("attention_mask", ir.DataType.INT64, ["batch", "total"])
    graph = ir.Graph([ids, mask_in], [], nodes=[], opset_imports={"": 18}, name="llama3_8b_shape")
    weights = _Weights(directory)
    nodes: list[ir.Node] = []

    def op(op_type, inputs, name, **attrs):
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name)
        nodes.append(node)
        return node.outputs[0]

    split_heads = add_initializer(graph, "shape.q", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    split_kv = add_initializer(graph, "shape.kv", np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64))
    merge = add_initializer(graph, "shape.merge", np.array([0, 0, HIDDEN], np.int64))
    expand_kv = add_initializer(graph, "shape.expand", np.array([1, 1, HEADS // KV_HEADS, 1, 1], np.int64))
    repeat_kv = add_initializer(graph, "shape.repeat", np.array([0, HEADS, -1, HEAD_DIM], np.int64))
    axis2 = add_initializer(graph, "axes.2", np.array([2], np.int64))
    scale = add_initializer(graph, "scale", np.array(HEAD_DIM**-0.5, np.float16))
    # Additive padding mask [batch, 1, 1, total]; causality is not needed to exercise the passes.
    mask_f = op("Cast", [mask_in], "mask/cast", to=f16)
    inverted = op("Sub", [add_initializer(graph, "one", np.array(1, np.float16)), mask_f], "mask/invert")
    additive = op("Mul", [inverted, add_initializer(graph, "neg", np.array(-65504, np.float16))], "mask/scale")
    mask = op("Unsqueeze", [additive, add_initializer(graph, "axes.12", np.array([1, 2], np.int64))], "mask/unsqueeze")

    hidden = op("Gather", [weights(graph, "embed_tokens", (VOCAB, HIDDEN)), ids], "embed")
    for n in range(layers):
        p = f"/model/layers.{n}"
        normed = op("Mul", [hidden, weights(graph, f"{p}.input_layernorm", (HIDDEN,))], f"{p}/norm")

        def proj(name, width):
            return op("MatMul", [normed, weights(graph, f"{p}.{name}", (HIDDEN, width))], f"{p}/{name}/MatMul")

        q = op("Transpose", [op("Reshape", [proj("q_proj", HIDDEN), split_heads], f"{p}/q_reshape")], f"{p}/q_t", perm=[0, 2, 1, 3])
        k_new = op("Transpose", [op("Reshape", [proj("k_proj", KV_HEADS * HEAD_DIM), split_kv], f"{p}/k_reshape")], f"{p}/k_t", perm=[0, 2, 1, 3])
        v_new = op("Transpose", [op("Reshape", [proj("v_proj", KV_HEADS * HEAD_DIM), split_kv], f"{p}/v_reshape")], f"{p}/v_t", perm=[0, 2, 1, 3])
        caches = {}
        for kind, new in (("key", k_new), ("value", v_new)):
            past = ir.val(f"past_key_values.{n}.{kind}", f16, ["batch", KV_HEADS, "past", HEAD_DIM])
            graph.inputs.append(past)
            present = op("Concat", [past, new], f"{p}/concat_{kind}", axis=2)
            present.name = f"present.{n}.{kind}"
            graph.outputs.append(present)
            grouped = op("Expand", [op("Unsqueeze", [present, axis2], f"{p}/{kind}_unsq"), expand_kv], f"{p}/{kind}_expand")
            caches[kind] = op("Reshape", [grouped, repeat_kv], f"{p}/{kind}_repeat")
        k_t = op("Transpose", [caches["key"]], f"{p}/k_transpose", perm=[0, 1, 3, 2])
        scores = op("Add", [op("Mul", [op("MatMul", [q, k_t], f"{p}/MatMul"), scale], f"{p}/Mul"), mask], f"{p}/Add")
        probs = op("Softmax", [scores], f"{p}/Softmax", axis=-1)
        context = op("MatMul", [probs, caches["value"]], f"{p}/MatMul_1")
        merged = op("Reshape", [op("Transpose", [context], f"{p}/ctx_t", perm=[0, 2, 1, 3]), merge], f"{p}/ctx_merge")
        hidden = op("Add", [hidden, op("MatMul", [merged, weights(graph, f"{p}.o_proj", (HIDDEN, HIDDEN))], f"{p}/o_proj/MatMul")], f"{p}/residual1")
        gate = op("MatMul", [hidden, weights(graph, f"{p}.gate_proj", (HIDDEN, FFN))], f"{p}/gate")
        up = op("MatMul", [hidden, weights(graph, f"{p}.up_proj", (HIDDEN, FFN))], f"{p}/up")
        act = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu"), up], f"{p}/gated")
        hidden = op("Add", [hidden, op("MatMul", [act, weights(graph, f"{p}.down_proj", (FFN, HIDDEN))], f"{p}/down")], f"{p}/residual2")
    logits = op("MatMul", [hidden, weights(graph, "lm_head", (HIDDEN, VOCAB))], "lm_head")
    logits.name = "logits"
    graph.outputs.insert(0, logits)
    graph.extend(nodes)
    with open(directory / DATA, "wb") as handle:
        handle.truncate(weights.offset)  # sparse: the bytes exist for readers, not on disk
    # serialize_model keeps ExternalTensor initializers as references: no weight is read.
    onnx.save_model(ir.serde.serialize_model(ir.Model(graph, ir_version=10)), directory / "model.onnx")
    return directory / "model.onnx"


def run_passes(model_path: Path, spans: list[str], save_dir: Path | None) -> dict:
    """In this process: load, detect, rewrite (and optionally save); time and peak RSS."""
    from graph_passes import apply_sharing_plan, cache_layers
    from sa_export.export.onnx_io import load_onnx, save_onnx
    from sa_export.core.plan import build_plan

    start = time.perf_counter()
    model = load_onnx(model_path)
    plan = build_plan(spans, len(cache_layers(model.graph)))
    report = apply_sharing_plan(model, plan)
    pass_seconds = time.perf_counter() - start
    rss_after_passes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "layers": plan.num_layers,
        "shared": len(plan.shared_layers),
        "weight_bytes_before": report.weight_bytes_before,
        "weight_bytes_after": report.weight_bytes_after,
        "pass_seconds": pass_seconds,
        "peak_rss_bytes_passes": rss_after_passes,
    }
    if save_dir is not None:
        start = time.perf_counter()
        save_dir.mkdir(parents=True, exist_ok=True)
        files = save_onnx(model, save_dir)
        result["save_seconds"] = time.perf_counter() - start
        result["saved_data_bytes"] = (save_dir / files[-1]).stat().st_size
        result["peak_rss_bytes_with_save"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/sa-export-scale")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--span", action="append", default=None)
    parser.add_argument("--save", action="store_true", help="also save with external data (writes the weights once)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spans = args.span or ["20-28"]
    directory = Path(args.dir)
    if args.child:
        save_dir = directory / "sa" if args.save else None
        print(json.dumps(run_passes(directory / "model.onnx", spans, save_dir)))
        return
    started = time.perf_counter()
    model_path = build(directory, args.layers)
    data_bytes = (directory / DATA).stat().st_size
    print(f"built {model_path} ({args.layers} layers, {data_bytes / 2**30:.2f} GiB of external fp16 weights) in {time.perf_counter() - started:.1f} s")
    command = [sys.executable, "-m", "sa_export.benchmarks.scale", "--child", "--dir", str(directory), *sum((["--span", s] for s in spans), [])]
    if args.save:
        command.append("--save")
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"passes (load + detect + rewrite, spans {','.join(spans)}): {result['pass_seconds']:.2f} s (goal < 30 s)")
    print(f"peak RSS of the pass process: {result['peak_rss_bytes_passes'] / gib:.3f} GiB (goal < 2 GiB)")
    removed = result["weight_bytes_before"] - result["weight_bytes_after"]
    print(f"weights: {result['weight_bytes_before'] / gib:.2f} GiB -> {result['weight_bytes_after'] / gib:.2f} GiB ({removed / 2**20:.0f} MiB of Q/K projections removed)")
    if "save_seconds" in result:
        print(
            f"save with external data: {result['save_seconds']:.1f} s, data file {result['saved_data_bytes'] / gib:.2f} GiB "
            f"(was {data_bytes / gib:.2f} GiB), peak RSS {result['peak_rss_bytes_with_save'] / gib:.3f} GiB"
        )


if __name__ == "__main__":
    main()

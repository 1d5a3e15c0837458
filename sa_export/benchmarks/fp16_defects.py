"""What the fp16 gate says of deliberately broken fp16 graphs of the demo model.

    python -m sa_export.benchmarks.fp16_defects [--model smollm2-135m] [--span 23-26] [-o DIR] [--json FILE]

Converts the model for a TensorRT target in fp16 (the concat graph of the JetPack 6
profile, so that every present is a plain output), then checks against the PyTorch SA
reference, side by side: the intact graph; the graph exported without the fp32 score
chain (Softmax and its inputs in fp16); the probabilities rounded to bfloat16; and one
present value cache halved (a broken cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graph_passes import apply_sharing_plan
from sa_export.core.manifest import Manifest
from sa_export.export import ExportOptions, get_exporter
from sa_export.hf.models import load_reference, resolve_model
from sa_export.stages.check import check_directory
from sa_export.stages.convert import ConvertRequest, convert

TARGET = "jetson-orin-jp6"


def _without_fp32_scores(source, plan):
    def build(_graph_model: ir.Model, work: Path) -> ir.Model:
        model = get_exporter("dynamo").export(source, ExportOptions("fp16"), work / "export16")
        apply_sharing_plan(model, plan, "fp32")  # the fp32 score chain is an fp16-only pass: skipped
        ir.external_data.load_to_model(model)
        return model

    return build


def _bf16_probabilities(model: ir.Model, work: Path) -> ir.Model:
    graph = model.graph
    for node in [n for n in graph if n.op_type == "Softmax"]:
        probs = node.outputs[0]
        down = ir.node("Cast", [probs], attributes={"to": ir.DataType.BFLOAT16})
        up = ir.node("Cast", [down.outputs[0]], attributes={"to": probs.dtype})
        graph.insert_after(node, [down, up])
        for use in list(probs.uses()):
            if use.node is not down:
                use.node.replace_input_with(use.idx, up.outputs[0])
        down.outputs[0].dtype, up.outputs[0].dtype = ir.DataType.BFLOAT16, probs.dtype
    return model


def scale_present(graph: ir.Graph, name: str, factor: float) -> None:
    """Multiply the present output ``name`` by ``factor``: the cache handed to the next step is wrong."""
    present = next(v for v in graph.outputs if v.name == name)
    scale = ir.Value(name=f"{name}.factor", const_value=ir.tensor(np.array(factor, present.dtype.numpy())))
    graph.register_initializer(scale)
    scaled = ir.node("Mul", [present, scale])
    graph.insert_after(present.producer(), scaled)
    index = list(graph.outputs).index(present)
    present.name, scaled.outputs[0].name = f"{name}.raw", name
    scaled.outputs[0].type, scaled.outputs[0].shape = present.type, present.shape
    graph.outputs[index] = scaled.outputs[0]


def _halved_cache(name: str):
    def build(model: ir.Model, work: Path) -> ir.Model:
        scale_present(model.graph, name, 0.5)
        return model

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--span", default="23-26")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("-o", "--out", type=Path, default=Path("fp16-defects"))
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    intact = args.out / "intact"
    result = convert(ConvertRequest(model=args.model, spans=(args.span,), out=intact, target=TARGET, overwrite=True))
    source = resolve_model(args.model)
    hf_model, tokenizer = load_reference(source)
    defects = {
        "fp16 score chain and Softmax": _without_fp32_scores(source, result.plan),
        "probabilities rounded to bf16": _bf16_probabilities,
        "present value cache of a middle layer halved": _halved_cache(f"present.{result.plan.num_layers // 3}.value"),
    }
    rows = {"intact": result.parity.summary_json()}
    print(f"intact: {result.parity.summary_line()}")
    for name, build in defects.items():
        work = args.out / name.split()[0]
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(intact, work, ignore=shutil.ignore_patterns("bundle"))
        model = build(ir.load(work / "model.onnx"), work)
        ir.save(model, work / "model.onnx")
        shutil.rmtree(work / "export16", ignore_errors=True)
        Manifest.read(work).with_files(work, ["model.onnx"]).write(work)
        report, _ = check_directory(work, hf_model, tokenizer, args.decode_steps)
        rows[name] = report.summary_json()
        print(f"{name}: {report.summary_line()}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

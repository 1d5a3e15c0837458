"""The sa-export command line. Thin click commands; errors become exit codes in cli.options."""

from __future__ import annotations

from pathlib import Path

import click

from sa_export import __version__
from sa_export.cli.options import (
    quiet_libraries, write_json, echo_report, json_option, POSITIVE_INTS, accept_keys_option, add_calib_option, analyze_calib_option, anchor_option, calib_option, calib_tokens_option, fit_options, force_option,
    handle_errors, head_map_option, memory_mode_option, prefill_chunk_option, span_option,
)
from sa_export.core.errors import UsageError
from sa_export.core.choices import AUTO, EXPORTER_NAMES, REMOVED_EXPORTERS
from targets.profiles import target_names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sa-export")
def main():
    """Shared Attention for decoder LLMs: export to ONNX, share attention probabilities
    across layers (smaller K cache, fewer FLOPs), and prove parity with PyTorch.

    Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 missing environment (package, GPU).
    """
    quiet_libraries()


@main.command()
@click.argument("model")
@span_option
@anchor_option
@head_map_option()
@fit_options
@calib_option
@add_calib_option
@calib_tokens_option
@click.option("--target", type=click.Choice(target_names()), default="cpu", show_default=True, help="Deployment target (`sa-export targets` lists them; jetson-orin = jetson-orin-nano-8gb).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default=None,
              help="fp16 keeps scores, Softmax and norms in fp32; int4 (--target cpu): the builder's 4-bit weight graph. [default: the target's]")
@click.option(
    "--exporter", type=click.Choice([AUTO, *EXPORTER_NAMES, *REMOVED_EXPORTERS]), default=AUTO, show_default=True,
    help="auto: the fastest graph the target and model allow, and why (genai on --target cpu for Llama/Qwen2 "
    "models with a tokenizer, else dynamo); dynamo: torch.onnx's dynamo exporter, decomposed attention, for every "
    "target; genai: onnxruntime-genai's builder, ONNX Runtime's fastest CPU graph (GroupQueryAttention, in-place "
    "cache buffers), --target cpu only. optimum was removed (it needs transformers<4.58).",
)
@click.option("--opset", type=click.Choice(["18", "23"]), default=None, help="Opset for --exporter dynamo; 23 exports SDPA as the ONNX Attention op. [default: 18]")
@click.option("--max-batch", type=click.IntRange(1), help="Largest batch for the engine profiles and memory fit [default: the target's].")
@click.option("--max-context", type=click.IntRange(2), help="Longest context (prompt + generated) to plan for; exit 1 if it does not fit the target.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Output directory (default: <model name>-sa).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against PyTorch.")
@click.option("--no-export-cache", is_flag=True,
              help="Export anew, without reading or keeping the graph exported before for the same model files, exporter, options and "
              "packages (kept in $SA_EXPORT_CACHE/exports, ~/.cache/sa-export by default; SA_EXPORT_CACHE_EXPORTS_GB caps it, 8 by default).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier output (it has sa_manifest.json; the old one stays intact until the new one is complete). Never a directory that is or holds MODEL.")
@click.option("--reference", metavar="HF_DIR", help="PyTorch model to check an ONNX input against.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled *.bin weights (runs code from the file: trusted sources only).")
@click.option("--decode-steps", type=click.IntRange(0, 4096), default=32, show_default=True, help="Incremental decoding steps in the check.")
@json_option("the summary")
@force_option
@accept_keys_option
@handle_errors
def convert(model, spans, anchors, head_map, fit_steps, lora_rank, calib_file, add_calib, calib_tokens, target, precision, exporter, opset, max_batch, max_context, out, no_check, no_export_cache, overwrite, reference, allow_pickle, decode_steps, json_file, force, accept_unknown_config_keys):
    """Convert MODEL (HF directory, ONNX with past key values, or alias smollm2-135m) to an SA ONNX model.

    \b
    Example:
      sa-export convert smollm2-135m --span 23-26 -o smollm2-sa
    """
    from sa_export.stages.check import raise_on_failure
    from sa_export.stages.convert import ConvertRequest, convert as run_convert

    if out is None:
        out = Path(f"{Path(model).name}-sa")
    calib_file = _with_added_calib(calib_file, add_calib, lora_rank, head_map, calib_tokens, fit_steps)
    request = ConvertRequest(
        model=model, spans=tuple(spans), out=out, anchors=tuple(anchors), target=target, precision=precision,
        check=not no_check, overwrite=overwrite, force=force, reference=reference, allow_pickle=allow_pickle,
        decode_steps=decode_steps, head_map=head_map, fit_steps=fit_steps, lora_rank=lora_rank, calib_file=calib_file, calib_tokens=calib_tokens,
        max_batch=max_batch, max_context=max_context, exporter=exporter, opset=int(opset) if opset else None,
        accept_unknown_config_keys=accept_unknown_config_keys, export_cache=not no_export_cache,
    )
    result = run_convert(request)
    echo_report(result.lines(), json_file)
    write_json(json_file, result.summary_json())
    raise_on_failure(result.parity, result.target)


def _with_added_calib(calib_file, add_calib, lora_rank, head_map, calib_tokens=None, fit_steps=None):
    """--calib's files (or the request's default texts) followed by --add-calib's; options
    that only a calibrated or fitted --head-map reads are refused without one, not ignored."""
    for given, option in ((calib_file, "--calib"), (add_calib, "--add-calib"), (calib_tokens, "--calib-tokens")):
        if given and head_map == "identity":
            raise UsageError(f"{option} sets calibration text, which --head-map identity does not read; give a calibrated --head-map")
    if fit_steps is not None and head_map != "fit":
        raise UsageError(f"--fit-steps sets the steps of --head-map fit's distillation: add --head-map fit (got {head_map})")
    if not add_calib:
        return calib_file
    from sa_export.accuracy.texts import calib_files_for

    return calib_files_for(calib_file, lora_rank or 0, add_calib)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True, help="Runtime to check: ONNX Runtime, or the TensorRT engine in OUT.")
@click.option("--reference", metavar="HF_DIR", help="PyTorch model to compare with (default: the manifest's source).")
@click.option("--decode-steps", type=click.IntRange(0, 4096), default=32, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled *.bin reference weights.")
@json_option("the parity report")
@accept_keys_option
@prefill_chunk_option
@handle_errors
def check(out, backend, reference, decode_steps, allow_pickle, json_file, accept_unknown_config_keys, prefill_chunk):
    """Check OUT against the PyTorch SA reference; writes OUT/parity.json. Exit 1 when out of tolerance."""
    from sa_export.stages.check import check as run_check, raise_on_failure

    report = run_check(out, reference, decode_steps, allow_pickle, backend, accept_unknown_config_keys, prefill_chunk or None)
    echo_report(report.lines(), json_file)
    write_json(json_file, report.to_json())
    raise_on_failure(report)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 8192), default=64, show_default=True)
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True, help="ONNX Runtime, or the TensorRT engine in OUT.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (instruct models).")
@prefill_chunk_option
@memory_mode_option("the ONNX Runtime session")
@handle_errors
def generate(out, prompt, max_new_tokens, backend, chat, prefill_chunk, memory_mode):
    """Greedy generation from OUT (no PyTorch needed); tokens stream as they come."""
    from sa_export.runtime import stream_generation

    if not prompt:
        raise UsageError("the prompt is empty: give --prompt some text to continue")
    for piece in stream_generation(out, prompt, max_new_tokens, backend, chat, prefill_chunk or None, memory_mode):
        click.echo(piece, nl=False)
    click.echo()


@main.command(name="eval")
@click.argument("model")
@span_option
@anchor_option
@head_map_option()
@fit_options
@click.option("--text", "text_file", type=click.Path(), help="Evaluation text (default: English news text shipped with gensim).")
@click.option("--other-text", "other_texts", multiple=True,
              help="Also evaluate on this text of another domain (repeat it for several; one fit serves them all); "
              "default names the default text below, none skips them. A calibration text is refused. "
              "[default: torch.nn.Module's Python source, or gensim's Wikipedia excerpt when the calibration reads that source, "
              "as it does with --lora-rank unless --calib]")
@calib_option
@add_calib_option
@click.option("--max-tokens", type=click.IntRange(2), default=4096, show_default=True, help="Tokens of text to evaluate.")
@calib_tokens_option
@click.option("--context", type=click.IntRange(2), default=1024, show_default=True, help="Window length for perplexity.")
@click.option("--tasks", help="Comma-separated lm-evaluation-harness tasks to run on the base and SA models (local data only).")
@click.option("--tasks-path", type=click.Path(exists=True, file_okay=False), help="Directory of extra task YAMLs (for local task data).")
@click.option("--tasks-limit", type=click.IntRange(1), help="Evaluate at most this many documents per task.")
@click.option("--precision", type=click.Choice(["fp32", "int4"]), default="fp32", show_default=True,
              help="int4: both models hold the weights of onnxruntime-genai's int4 graph (dequantized).")
@json_option("base_ppl, sa_ppl, eval_tokens, calib_tokens...")
@force_option
@accept_keys_option
@handle_errors
def eval_command(model, spans, anchors, head_map, fit_steps, lora_rank, text_file, other_texts, calib_file, add_calib, max_tokens, calib_tokens, context, tasks, tasks_path, tasks_limit, precision, json_file, force, accept_unknown_config_keys):
    """Perplexity of MODEL and of its SA version on the same text, and the difference."""
    from sa_export.accuracy.evaluate import EvalRequest, evaluate

    calib_file = _with_added_calib(calib_file, add_calib, lora_rank, head_map, calib_tokens, fit_steps)
    result = evaluate(
        EvalRequest(
            model, tuple(spans), tuple(anchors), head_map, text_file, calib_file, max_tokens, calib_tokens, context, force,
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else (), tasks_path=tasks_path, tasks_limit=tasks_limit,
            accept_unknown_config_keys=accept_unknown_config_keys, precision=precision, other_texts=tuple(other_texts),
            fit_steps=fit_steps, lora_rank=lora_rank,
        )
    )
    echo_report(result.lines(), json_file)
    write_json(json_file, result.to_json())


@main.command()
@click.argument("model")
@analyze_calib_option
@calib_tokens_option
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Output directory (default: <model name>-analysis).")
@click.option("--share", type=int, help="Search spans of this many layers by perplexity and recommend the best.")
@click.option("--kv-saving", type=float, help="Or: the KV-cache fraction to save, above 0 and below 0.5 (0.067: 4 of SmolLM2's 60 K and V caches); sets the span length, or with --frontier picks its point.")
@head_map_option(fitted=False)
@click.option("--candidates", type=click.IntRange(1), default=6, show_default=True, help="Most similar spans to evaluate by perplexity.")
@click.option("--frontier", is_flag=True, help="Search plans of 1..--max-shared layers (several spans, each with its anchor) per head-map mode; "
              "writes frontier.json and frontier.png (penalty vs KV saved, on held-out text of the first --calib's domain and on --other-text). "
              "With several --calib the search takes each plan's mean penalty over them (--search-cost). --kv-saving or --max-penalty picks a point.")
@click.option("--max-shared", type=click.IntRange(1), default=8, show_default=True, help="Frontier: most layers to share.")
@click.option("--frontier-maps", default="identity,mix-few", show_default=True,
              help="Frontier: the head-map modes to search, comma-separated (each mode is a search of its own).")
@click.option("--frontier-unit", "frontier_units", default="layer", show_default=True,
              help="Frontier: what a plan adds one at a time: layer, kv-group (one KV group of a layer, --span L.G; up to as many "
              "groups as --max-shared layers hold, so the same savings in finer steps), or layer,kv-group for both curves.")
@click.option("--search-pool", type=click.IntRange(1), help="Frontier: each plan adds the best of this many layers, "
              "the cheapest shared alone; fewer search faster. [default: 12]")
@click.option("--search-cost", type=click.Choice(["mean", "worst"]), default="mean", show_default=True,
              help="Frontier, several --calib: rank plans by their mean or their worst relative penalty over the search texts.")
@click.option("--max-penalty", type=click.FloatRange(0), help="Frontier: the largest saving whose perplexity penalty (e.g. 0.04 = +4%) holds on every text it reports on.")
@click.option("--other-text", "other_texts", multiple=True,
              help="Frontier: text of another domain than every --calib; repeat it to report on several (default names the default text). "
              "[default: torch.nn.Module's Python source, or gensim's Wikipedia excerpt when that source is a --calib]")
@click.option("--eval-tokens", type=click.IntRange(2), help="Frontier: tokens of each text the plans are judged on; more give narrower "
              "95% intervals (blocks of 512 tokens) and take longer to judge. [default: 2048]")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier analysis (it has similarity.json).")
@accept_keys_option
@handle_errors
def analyze(model, calib_file, calib_tokens, out, share, kv_saving, head_map, candidates, frontier, max_shared, frontier_maps, frontier_units, search_pool, search_cost, max_penalty, other_texts, eval_tokens, overwrite, accept_unknown_config_keys):
    """Layer-by-layer attention similarity (similarity.json, similarity.png), a ranking of spans,
    and with --share/--kv-saving a perplexity search that prints the convert command to use."""
    from sa_export.accuracy.analysis import AnalyzeRequest, analyze as run_analyze

    if out is None:
        out = Path(f"{Path(model).name}-analysis")
    if calib_file is not None and len(calib_file) > 1 and not frontier:
        raise UsageError("analyze's span search calibrates on one text: pass one --calib (several are for --frontier)")
    if not frontier:
        _refuse_frontier_options_without_frontier()
    units = tuple(unit.strip() for unit in frontier_units.split(",") if unit.strip())
    from sa_export.accuracy.frontier import UNITS

    if not units or not set(units) <= set(UNITS) or len(set(units)) != len(units):
        raise UsageError(f"--frontier-unit {frontier_units}: choose {' or '.join(UNITS)}, or both (layer,kv-group)")
    if calib_file is not None and len(calib_file) == 1:
        calib_file = calib_file[0]
    result = run_analyze(
        AnalyzeRequest(
            model, out, calib_file, calib_tokens, share, kv_saving, head_map, candidates, overwrite=overwrite,
            accept_unknown_config_keys=accept_unknown_config_keys, frontier=frontier, max_shared=max_shared,
            max_penalty=max_penalty, other_texts=tuple(other_texts), search_pool=search_pool, search_cost=search_cost,
            eval_tokens=eval_tokens or AnalyzeRequest.eval_tokens, frontier_modes=tuple(mode.strip() for mode in frontier_maps.split(",") if mode.strip()),
            frontier_units=units,
        )
    )
    click.echo("\n".join(result.lines()))


def _refuse_frontier_options_without_frontier() -> None:
    """analyze's frontier options change nothing without --frontier: refused, not ignored."""
    from click.core import ParameterSource

    context = click.get_current_context()
    for param in context.command.params:
        if param.name in FRONTIER_ONLY and context.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            raise UsageError(f"{param.opts[0]} is an option of the frontier search; give it with --frontier")


FRONTIER_ONLY = ("max_shared", "frontier_maps", "frontier_units", "search_pool", "search_cost", "max_penalty", "other_texts", "eval_tokens")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--baseline", default="fastest", show_default=True,
    help="fastest: the fastest graph ONNX Runtime runs for the unmodified model (onnxruntime-genai's builder: "
    "GroupQueryAttention, in-place cache buffers), built once and cached; same-export: OUT's own exporter without "
    "sharing; or an OUT-style directory.",
)
@click.option("--contexts", default="256,2048,8192", type=POSITIVE_INTS, show_default=True, help="Context lengths for decode timing.")
@click.option("--batches", default="1,4", type=POSITIVE_INTS, show_default=True, help="Batch sizes for decode timing.")
@click.option("--repeats", type=click.IntRange(1), default=21, show_default=True, help="At least this many timed decode steps per model and point (medians are reported).")
@click.option(
    "--min-seconds", type=click.FloatRange(0), default=3.0, show_default=True,
    help="Keep timing each decode point until this much time has passed: short steps are noisy and get more samples.",
)
@click.option(
    "--interval", type=click.FloatRange(0), default=0.005, show_default=True,
    help="Then keep timing each decode point until the 95% interval of its SA/base ratio is within +- this much "
    "(0: off), up to --max-seconds: a long step's ratio moves by several hundredths over a few seconds of pairs.",
)
@click.option("--max-seconds", type=click.FloatRange(0), default=30.0, show_default=True, help="The most time --interval may take per decode point.")
@click.option(
    "--processes", type=click.IntRange(1), default=3, show_default=True,
    help="Pairs of fresh processes (one model each) that time every decode point, --min-seconds and --max-seconds shared "
    "among them: one process runs steadily faster or slower than another by up to a few percent, and the interval covers that only "
    "across processes.",
)
@click.option("--prefill-tokens", default="512,2048,8192", type=POSITIVE_INTS, show_default=True, help="Prompt lengths of the prefill timing.")
@click.option("--prefill-repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed prefills per model and length, at least: short prompts get more, until 10 s have passed (at most 25).")
@click.option("--prefill-memory/--no-prefill-memory", default=True, show_default=True, help="Peak RSS of each model's prefill, each in its own process.")
@click.option(
    "--memory-runs", type=click.IntRange(1), default=3, show_default=True,
    help="Processes per model and prompt length for the peak RSS (alternating order; the median is reported): one process's peak moves by a few percent.",
)
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
@memory_mode_option("both models, in every process of the bench (times and peaks)")
@json_option("the results")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), help="Decode time vs context plot (default: OUT/bench.png).")
@prefill_chunk_option
@handle_errors
def bench(
    out, baseline, contexts, batches, repeats, min_seconds, interval, max_seconds, processes, prefill_tokens, prefill_repeats, prefill_memory, memory_runs,
    threads, memory_mode, json_file, plot_file, prefill_chunk,
):
    """Decode and prefill time, KV and weight bytes of OUT against the unshared model,
    measured side by side, each model in a process of its own (steps interleaved, medians), with the ideal saving of
    a memory-bound decode step next to each. Each SA/base time ratio comes with a 95%
    bootstrap interval over the pairs of processes and the pairs of steps in each (each
    decode point is timed until it is within +- --interval, up to --max-seconds, on each of
    --processes pairs of processes), carried over to measured/ideal, and the
    last lines name the points where SA is slower beyond that noise. The default baseline is the fastest graph
    ONNX Runtime runs for the unmodified model; convert with --exporter genai for the SA
    graph that keeps that speed."""
    from sa_export.stages.bench import Sampling, bench_lines, run_bench, save_plot
    from sa_export.core.progress import progress_bar

    with progress_bar("benchmark: decode steps, interleaved", unit="point") as advance:
        result = run_bench(
            out, baseline, contexts, batches, Sampling(repeats, min_seconds, interval, max_seconds, processes), prefill_tokens, threads, advance,
            prefill_repeats, prefill_chunk or None, memory_runs if prefill_memory else 0, memory_mode,
        )
    echo_report(bench_lines(result), json_file)
    plot_file = plot_file or Path(out) / "bench.png"
    save_plot(result["decode"], plot_file, result["model"], result["prefill"])
    click.echo(f"plot: {plot_file}", err=json_file == "-")
    write_json(json_file, result)


@main.command()
@handle_errors
def targets():
    """List the deployment targets with the JetPack, TensorRT and CUDA each assumes (`jetson-orin` is an alias of jetson-orin-nano-8gb)."""
    from rich.console import Console
    from rich.table import Table

    from targets.profiles import ALIASES, TABLE_COLUMNS, table_rows

    table = Table(title="sa-export targets")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for row in table_rows():
        table.add_row(*row)
    Console(width=180).print(table)
    for alias, name in ALIASES.items():
        click.echo(f"alias: {alias} -> {name}")


@main.command(name="gpu-check")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model to convert (HF directory or alias).")
@click.option("--span", "spans", multiple=True, default=("20-28",), show_default=True, metavar="A-B", help="Layers to share.")
@click.option("--target", type=click.Choice(target_names()), default="hopper", show_default=True, help="A target whose engine is built here.")
@click.option("--contexts", default="512,2048,8192", type=POSITIVE_INTS, show_default=True, help="Contexts of the decode timing.")
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True, help="Timed decode steps per model and context.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("gpu-check"), show_default=True, help="Where the engines and gpu_check.json go.")
@click.option("--overwrite", is_flag=True, help="Replace earlier results in OUT.")
@handle_errors
def gpu_check_command(model, spans, target, contexts, steps, out, overwrite):
    """On a machine with an NVIDIA GPU and TensorRT: build the unshared and the SA engine, check
    both against PyTorch (TensorRT parity) and time a decode step of each at several contexts,
    writing OUT/gpu_check.json. Exit 1 when parity fails, 3 without a GPU or TensorRT."""
    from sa_export.core.errors import CheckFailed
    from sa_export.stages.gpu_check import GpuCheckRequest, gpu_check

    report = gpu_check(GpuCheckRequest(model, tuple(spans), target, out, tuple(contexts), steps, overwrite))
    for row in report["decode"]:
        click.echo(f"context {row['context']:>6}: base {row['t_base_ms']:.3f} ms, SA {row['t_sa_ms']:.3f} ms, SA/base {row['time_ratio_sa_to_base']:.3f}")
    click.echo(f"TensorRT parity: base {report['base']['trt_parity']['passed']}, SA {report['sa']['trt_parity']['passed']}; {out / 'gpu_check.json'}")
    if not report["passed"]:
        raise CheckFailed("TensorRT parity failed; see gpu_check.json")


@main.command(name="build-engine")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@handle_errors
def build_engine_command(out):
    """Build OUT's TensorRT engine here through the Python API (on the Jetson for Jetson targets)."""
    from sa_export.stages.target import build_engine_for

    click.echo(f"engine: {build_engine_for(out)}")

"""`bench`: the SA model against its baseline (same weights, no sharing), side by side.

Each model runs in a process of its own (two sessions in one process do not run at one
speed), the steps interleaved pair by pair, several repetitions, and the medians are
compared, because this machine is noisy; and on several pairs of fresh processes, since
one process runs steadily faster or slower than another by up to a few percent. Next to each measured
saving the analytic model of a decode step prints the ideal one: a decode step is
memory-bound, so its ideal time is proportional to the bytes it reads (weights plus
the KV cache at that context).

The baseline is the same export without sharing, built once per source model and
cached; `--baseline DIR` takes one. For a model converted with `--exporter genai` that
is the fastest graph ONNX Runtime runs for the unmodified model (onnxruntime-genai's
builder: GroupQueryAttention, in-place cache buffers), and the SA model is the same
graph rewritten, so the comparison is fused against fused.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from sa_export.core.cache_names import WEIGHT_BYTES_PER_PARAMETER
from sa_export.core.errors import UsageError
from sa_export.core.manifest import MANIFEST_NAME, Manifest
from sa_export.export import exporter_of_manifest, get_exporter
from sa_export.stages.pairing import grouped_ratio, grouped_ratio_interval, interval_text, paired_times, verdict_lines
from sa_export.stages.prefill import prefill_lines, prefill_rows
from sa_export.stages.timing_worker import TimedPair

WARMUP_PAIRS = 3
MAX_PAIRS = 400  # bounds --min-seconds on a tiny model whose steps take microseconds


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Analytic cost of one decode step: bytes read and FLOPs."""

    weight_bytes: int
    kv_bytes: int
    flops: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def _num_heads(manifest: Manifest) -> int:
    return manifest.model.num_heads if manifest.model else manifest.cache.num_kv_heads


def decode_step_cost(manifest: Manifest, weight_bytes: int, context: int, batch: int) -> StepCost:
    """Weights are read once per step; the cache once per sequence; FLOPs: 2 per weight per token
    plus Q K^T (layers that compute attention) and probs @ V (every layer)."""
    cache = manifest.cache
    per_token = cache.savings.bytes_per_token_sa
    attention_layers = sum(cache.key_share(layer) for layer in cache.layers)
    flops = batch * (2 * weight_bytes / WEIGHT_BYTES_PER_PARAMETER[manifest.precision] + 2 * _num_heads(manifest) * cache.head_dim * context * (attention_layers + manifest.num_layers))
    return StepCost(weight_bytes, batch * context * per_token, flops)


def qk_projection_bytes(manifest: Manifest) -> int:
    """Bytes of the Q and K projection weights that sharing removes (layers without a K cache,
    and the shared KV groups' share of a partly shared layer's)."""
    cache = manifest.cache
    shared = sum(1 - cache.key_share(layer) for layer in cache.layers)
    heads = _num_heads(manifest)
    hidden = manifest.model.hidden_size if manifest.model else heads * cache.head_dim
    return int(shared * hidden * (heads + cache.num_kv_heads) * cache.head_dim * WEIGHT_BYTES_PER_PARAMETER[manifest.precision])


def weight_bytes(out_dir: Path, manifest: Manifest) -> int:
    """Bytes of the model files (graph and external data)."""
    return sum((out_dir / name).stat().st_size for name in manifest.files if name.startswith(manifest.model_file))


@dataclasses.dataclass(frozen=True)
class DecodeRow:
    context: int
    batch: int
    t_base_ms: float  # the mean over pairs of processes of each one's median step
    t_sa_ms: float
    ideal_saving: float
    base: StepCost
    sa: StepCost
    steps: int  # timed steps per model, all processes together
    ratio_ci95: tuple[float, float]  # bootstrap interval of t_sa_ms / t_base_ms (pairing.grouped_ratio_interval)
    ratio_by_process: tuple[float, ...] = ()  # each pair of processes' median SA/base

    @property
    def measured_saving(self) -> float:
        return 1 - self.t_sa_ms / self.t_base_ms

    def to_json(self) -> dict:
        low, high = self.ratio_ci95
        return {
            "context": self.context,
            "batch": self.batch,
            "steps": self.steps,
            "t_base_ms": self.t_base_ms,
            "t_sa_ms": self.t_sa_ms,
            "ideal_saving": self.ideal_saving,
            "base_bytes": self.base.bytes,
            "sa_bytes": self.sa.bytes,
            "kv_bytes_base": self.base.kv_bytes,
            "kv_bytes_sa": self.sa.kv_bytes,
            "flops_base": self.base.flops,
            "flops_sa": self.sa.flops,
            "measured_saving": self.measured_saving,
            "ratio_measured_to_ideal": self.measured_saving / self.ideal_saving if self.ideal_saving else None,
            # the time ratio's interval carried over: a saving of 1 - ratio, over the ideal
            "ratio_measured_to_ideal_ci95": [(1 - high) / self.ideal_saving, (1 - low) / self.ideal_saving] if self.ideal_saving else None,
            "time_ratio_sa_to_base": self.t_sa_ms / self.t_base_ms,
            "time_ratio_ci95": list(self.ratio_ci95),
            "time_ratio_by_process": list(self.ratio_by_process),
            "tokens_per_s_base": 1000 * self.batch / self.t_base_ms,
            "tokens_per_s_sa": 1000 * self.batch / self.t_sa_ms,
        }


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How long each decode point is timed: at least ``repeats`` pairs and ``min_seconds``
    (short steps are noisy), then, with ``half_width``, until the 95% interval of SA/base
    is within +- ``half_width`` or ``max_seconds`` have passed (pairing.paired_times).
    ``processes``: pairs of fresh processes that each time every point, with ``repeats``
    pairs of steps each and the seconds shared out among them."""

    repeats: int
    min_seconds: float = 0.0
    half_width: float = 0.0
    max_seconds: float = 0.0
    processes: int = 1


def _paired_steps(pair: TimedPair, sampling: Sampling):
    """Step times of both models, interleaved pair by pair, as ``sampling`` says for one pair of processes."""
    for _ in range(WARMUP_PAIRS):
        pair.sa.step(), pair.base.step()
    share = sampling.processes
    return paired_times(
        pair.sa.step, pair.base.step, sampling.repeats, sampling.min_seconds / share, MAX_PAIRS, sampling.half_width, sampling.max_seconds / share,
    )


Times = list[tuple[list[float], list[float]]]  # per pair of processes: (SA step times, baseline step times)


def time_decode(pair: TimedPair, points: list[tuple[int, int]], sampling: Sampling, times: dict[tuple[int, int], Times], progress=None) -> None:
    """Time every (context, batch) point on one pair of processes, adding to ``times``."""
    for index, (context, batch) in enumerate(points):
        # Each side gets random inputs of its own: a decode step's time does not depend on the values.
        pair.load("decode", (batch, context, 2 * index), (batch, context, 2 * index + 1))
        times.setdefault((context, batch), []).append(_paired_steps(pair, sampling))
        if progress is not None:
            progress(sum(map(len, times.values())), len(points) * sampling.processes)


def decode_rows(times: dict[tuple[int, int], Times], sa_manifest: Manifest, base_manifest: Manifest, base_weights: int) -> list[DecodeRow]:
    # The ideal is the same model with and without sharing: the baseline's weights, less the
    # Q/K projections the SA model drops (the two graphs may come from different exporters,
    # whose files differ in more than that).
    sa_weights = base_weights - qk_projection_bytes(sa_manifest)
    rows = []
    for (context, batch), groups in times.items():
        sa_cost = decode_step_cost(sa_manifest, sa_weights, context, batch)
        base_cost = decode_step_cost(base_manifest, base_weights, context, batch)
        t_sa = 1000 * statistics.fmean(statistics.median(sa) for sa, _ in groups)
        t_base = 1000 * statistics.fmean(statistics.median(base) for _, base in groups)
        rows.append(
            DecodeRow(
                context, batch, t_base, t_sa, 1 - sa_cost.bytes / base_cost.bytes, base_cost, sa_cost, sum(len(sa) for sa, _ in groups),
                grouped_ratio_interval(groups), tuple(grouped_ratio([group]) for group in groups),
            )
        )
    return rows


def graph_description(manifest: Manifest) -> str:
    """Which graph a side ran, in words, for the table and the JSON."""
    exporter = manifest.exporter or "optimum"  # manifests before the exporter was recorded
    shared = bool(manifest.plan.anchors)
    if manifest.cache.buffer == "shared":
        graph = "onnxruntime-genai builder graph: packed QKV, GroupQueryAttention with rotary, in-place cache buffers (IOBinding)"
        sa = "; SA: shared layers project V only and write it in place (TensorScatter); "
        maps = [m for m in (manifest.plan.head_map(layer) for layer in manifest.plan.anchors) if m is not None]
        if any(m.width > 1 for m in maps):
            sa += "the sources' GQA emit their probabilities, mixed per layer, @ V grouped by KV head"
        elif maps:
            sa += ("at a decode step each layer's heads gathered from the sources' stored probabilities @ V grouped by KV head, "
                   "at prefill one GQA per key and value group read, on the source heads' queries and K caches")
        else:
            sa += "at a decode step the anchor's stored probabilities @ V grouped by KV head, at prefill GQA on the anchor's queries and K cache"
        if manifest.plan.shared_groups:
            sa += "; partly shared layers (KV groups) keep a GQA over the kept groups' heads, K and V, and a V cache of the borrowed groups"
    else:
        graph = f"{exporter} export, decomposed attention, cache concatenated each step"
        sa = "; SA: shared layers read the anchor's softmax, Q/K removed"
        if manifest.plan.shared_groups:
            sa += "; partly shared layers (KV groups) keep the other groups' Q/K and Softmax, concatenated with the borrowed heads'"
    return graph + (sa if shared else ", no sharing")


FASTEST = "fastest"  # onnxruntime-genai's builder graph of the source model
SAME_EXPORT = "same-export"  # the SA model's own exporter, without sharing
FASTEST_EXPORTER = "genai"


def baseline_dir(out_dir: Path, manifest: Manifest, kind: str = FASTEST) -> Path:
    """The cached unshared graph of the same source; built if missing.

    ``fastest``: the fastest graph ONNX Runtime runs for the unmodified model (fused
    GroupQueryAttention, in-place cache buffers). ``same-export``: the SA model's own
    exporter and precision without sharing, which isolates what sharing changes.
    """
    from sa_export.export.cache import evict_least_recent, limit_bytes, mark_used
    from sa_export.hf.models import cache_dir
    from sa_export.stages.baseline import baseline_key, build_baseline

    exporter = get_exporter(FASTEST_EXPORTER) if kind == FASTEST else exporter_of_manifest(manifest.exporter)
    if kind == FASTEST and manifest.precision not in exporter.precisions:
        raise UsageError(
            f"the fastest ONNX Runtime baseline is an {'/'.join(exporter.precisions)} CPU graph and {out_dir} is {manifest.precision}; "
            "pass --baseline same-export"
        )
    # The model's content, not its path (a checkpoint saved again in place is a new
    # baseline), and the packages and code that build it (an upgrade is a new baseline).
    target = cache_dir() / "baselines" / baseline_key(manifest, exporter)
    if (target / MANIFEST_NAME).is_file():
        mark_used(target)
    else:
        build_baseline(manifest, target, exporter)
        # Baselines of models and versions no longer used go, as kept exports do, past the same limit.
        evict_least_recent(target.parent, limit_bytes())
    return target


def save_plot(rows: list[dict], path: Path, title: str, prefill: list[dict] | None = None) -> None:
    """Decode time against context, one line per model and batch; with prefill rows, a second
    panel with prefill time and each model's peak memory against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if prefill else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5), squeeze=False)
    ax = axes[0][0]
    for batch in sorted({r["batch"] for r in rows}):
        selected = [r for r in rows if r["batch"] == batch]
        contexts = [r["context"] for r in selected]
        ax.plot(contexts, [r["t_base_ms"] for r in selected], "o--", label=f"baseline, batch {batch}")
        ax.plot(contexts, [r["t_sa_ms"] for r in selected], "o-", label=f"SA, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if prefill:
        ax = axes[0][1]
        tokens = [r["tokens"] for r in prefill]
        ax.plot(tokens, [r["t_base_ms"] for r in prefill], "o--", color="tab:blue", label="baseline prefill")
        ax.plot(tokens, [r["t_sa_ms"] for r in prefill], "o-", color="tab:orange", label="SA prefill")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt (tokens)")
        ax.set_ylabel("prefill (ms, median)")
        ax.set_title("prefill time, and peak memory of each model in its own process")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
        if "peak_rss_sa_bytes" in prefill[0]:
            memory = ax.twinx()
            memory.plot(tokens, [r["peak_rss_base_bytes"] / 2**30 for r in prefill], "s--", color="tab:green", label="baseline peak RSS")
            memory.plot(tokens, [r["peak_rss_sa_bytes"] / 2**30 for r in prefill], "s-", color="tab:red", label="SA peak RSS")
            memory.set_ylabel("peak RSS (GiB)")
            memory.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    out_dir: Path, baseline: str | Path, contexts, batches, sampling: Sampling, prefill_tokens, threads: int | None,
    progress=None, prefill_repeats: int | None = None, prefill_chunk: int | None = None,
    memory_runs: int = 3, memory: str = "arena",
) -> dict:
    """``sampling``: how long each decode point is timed, and on how many pairs of processes
    (the prefill times are taken on the first); ``baseline``: FASTEST, SAME_EXPORT or
    an OUT-style directory; ``prefill_tokens``: prompt lengths (an int or several);
    ``memory_runs``: processes per model and length for the peak RSS of a prefill (0: not
    measured); ``memory``: both models' memory mode (``runtime.memory``)."""
    manifest = Manifest.read(out_dir)
    manifest.require_artifacts(out_dir)  # before minutes of building a baseline
    if str(baseline) in (FASTEST, SAME_EXPORT):
        base_path = baseline_dir(Path(out_dir), manifest, str(baseline))
    else:
        base_path = Path(baseline)
        if not base_path.is_dir():
            raise UsageError(f"--baseline {baseline}: no such directory (or give {FASTEST} or {SAME_EXPORT})")
    base_manifest = Manifest.read(base_path)
    if base_manifest.num_layers != manifest.num_layers or base_manifest.cache.head_dim != manifest.cache.head_dim:
        raise UsageError(f"baseline {base_path} is not the same model as {out_dir}")
    lengths = [prefill_tokens] if isinstance(prefill_tokens, int) else list(prefill_tokens)
    points = [(context, batch) for context in contexts for batch in batches]
    times: dict[tuple[int, int], Times] = {}
    peaks: dict[str, int | None] = {}
    prefill: list[dict] = []
    for run in range(sampling.processes):
        with TimedPair(out_dir, base_path, threads, memory) as pair:
            time_decode(pair, points, sampling, times, progress)
            if run == 0:
                prefill = prefill_rows(pair, lengths, prefill_repeats or sampling.repeats, prefill_chunk, memory_runs, threads, memory)
        for side, peak in pair.peak_rss.items():
            peaks[side] = max(filter(None, (peak, peaks.get(side))), default=None)
    rows = decode_rows(times, manifest, base_manifest, weight_bytes(base_path, base_manifest))
    graph_kind = "fused" if manifest.cache.buffer == "shared" else "decomposed"
    savings = manifest.cache.savings
    return {
        "model": manifest.source.model,
        "sa": {"dir": str(out_dir), "graph": graph_description(manifest)},
        "baseline": {"dir": str(base_path), "graph": graph_description(base_manifest)},
        "sa_graph_kind": graph_kind,
        "partly_shared_layers": sorted(manifest.plan.shared_groups),
        "threads": threads,
        "memory": memory,
        "repeats": sampling.repeats,
        "min_seconds": sampling.min_seconds,
        "interval": sampling.half_width,
        "max_seconds": sampling.max_seconds,
        "processes": sampling.processes,
        "kv_bytes_per_token": {"base": savings.bytes_per_token_base, "sa": savings.bytes_per_token_sa},
        "weight_bytes": {"base": weight_bytes(base_path, base_manifest), "sa": weight_bytes(Path(out_dir), manifest)},
        "decode": [r.to_json() for r in rows],
        "prefill": prefill,
        # Each timing process holds one model: the decode caches of the largest point and the prefills.
        "timing_peak_rss_bytes": peaks,
    }


def bench_lines(result: dict) -> list[str]:
    """The table `bench` prints, from its JSON."""
    lines: list[str] = []
    lines.append(f"SA:       {result['sa']['graph']} ({result['sa']['dir']})")
    lines.append(f"baseline: {result['baseline']['graph']} ({result['baseline']['dir']})")
    kv, weights = result["kv_bytes_per_token"], result["weight_bytes"]
    lines.append(f"KV cache: {kv['base']:,} -> {kv['sa']:,} B/token; weights {weights['base']:,} -> {weights['sa']:,} B")
    processes = result.get("processes", 1)
    if processes > 1:
        lines.append(f"decode: each point timed on {processes} pairs of fresh processes; ms are the mean of their medians, "
                     "intervals resample the processes, then the steps")
    lines.append(f"{'context':>8} {'batch':>5} {'steps':>5} {'base ms':>9} {'SA ms':>9} {'SA/base':>8} {'95% interval':>13} {'measured':>9} {'ideal':>7} {'meas/ideal':>10} {'95% interval':>13} {'KV base MiB':>12} {'KV SA MiB':>10} {'FLOPs SA/base':>13}")
    for row in result["decode"]:
        ratio = row["ratio_measured_to_ideal"]
        ideal_interval = row.get("ratio_measured_to_ideal_ci95")
        lines.append(
            f"{row['context']:>8} {row['batch']:>5} {row['steps']:>5} {row['t_base_ms']:>9.2f} {row['t_sa_ms']:>9.2f} {row['time_ratio_sa_to_base']:>8.3f} "
            f"{interval_text(row.get('time_ratio_ci95')):>13} "
            f"{100 * row['measured_saving']:>8.1f}% {100 * row['ideal_saving']:>6.1f}% {ratio if ratio is not None else float('nan'):>10.2f} "
            f"{f'{ideal_interval[0]:.2f}-{ideal_interval[1]:.2f}' if ideal_interval else '-':>13} "
            f"{row['kv_bytes_base'] / 2**20:>12.1f} {row['kv_bytes_sa'] / 2**20:>10.1f} {row['flops_sa'] / row['flops_base']:>13.3f}"
        )
    lines += verdict_lines("decode", [(f"{r['context']}x{r['batch']}", r) for r in result["decode"]])
    lines += prefill_lines(result["prefill"])
    measured = [r for r in result["prefill"] if "peak_rss_sa_bytes" in r]
    above = [f"{r['tokens']} tokens" for r in measured if r["peak_rss_sa_bytes"] > r["peak_rss_base_bytes"]]
    if measured:
        lines.append(f"SA's prefill peak RSS above the baseline's at: {', '.join(above)}" if above else "SA's prefill peak RSS is not above the baseline's at any length")
    if result["sa_graph_kind"] != "fused":
        lines.append("note: OUT is a decomposed graph (the TensorRT path); `convert --exporter genai` makes the SA graph that is fast on ONNX Runtime")
    peaks = result.get("timing_peak_rss_bytes") or {}
    if peaks.get("sa") and peaks.get("base"):
        lines.append(f"peak RSS of the timing processes (one model each, the largest): SA {peaks['sa'] / 2**30:.2f} GiB, baseline {peaks['base'] / 2**30:.2f} GiB")
    return lines

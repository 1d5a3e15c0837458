"""`analyze`: how similar the layers' attention is, which spans to share, and at what cost."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from sa_export.core.atomic import atomic_directory, refuse_existing, refuse_to_replace
from sa_export.accuracy.calibration import FITTED_MODES, HEAD_MAP_MODES, AttentionStatistics, calibrate_head_maps, collect_statistics
from sa_export.core.errors import UsageError
from sa_export.accuracy.evaluate import layer_inputs_of, load_for_reference, perplexity
from sa_export.core.atomic import write_json_atomic
from sa_export.hf.models import resolve_model
from sa_export.core.plan import Span, build_plan, kv_fraction_saved
from sa_export.core.progress import progress_bar, step
from sa_export.accuracy.frontier import DEFAULT_POOL, DEFAULT_SEARCH_COST, recommend, save_plot, search_frontier
from sa_export.accuracy.texts import (
    TokenText, calib_paths, calib_tokens_for, other_domain_texts, other_text_files, split_texts,
)


@dataclasses.dataclass(frozen=True)
class AnalyzeRequest:
    model: str
    out: Path
    calib_file: str | tuple[str, ...] | None = None  # several files: the frontier searches on each
    calib_tokens: int | None = None  # None: texts.calib_tokens_for's default
    share: int | None = None  # layers to share; runs the perplexity search
    kv_saving: float | None = None  # or: the KV-cache fraction to save
    head_map: str = "identity"
    candidates: int = 6
    search_tokens: int = 2048
    overwrite: bool = False
    accept_unknown_config_keys: bool = False
    frontier: bool = False  # search plans of 1..max_shared layers per mode (sa_export.accuracy.frontier)
    max_shared: int = 8
    max_penalty: float | None = None
    other_texts: tuple[str, ...] = ()  # frontier: texts of other domains (texts.other_domain_texts)
    frontier_modes: tuple[str, ...] = ("identity", "mix-few")  # the accurate mixture whose decode step is never slower
    eval_tokens: int = 2048  # of each frontier evaluation text
    search_pool: int | None = None  # frontier: single layers each greedy step tries (None: frontier.DEFAULT_POOL)
    search_cost: str = DEFAULT_SEARCH_COST  # frontier: a plan's cost over several search texts (frontier.SEARCH_COSTS)
    frontier_units: tuple[str, ...] = ("layer",)  # frontier: what a plan adds one at a time (frontier.UNITS)


@dataclasses.dataclass(frozen=True)
class SpanCandidate:
    span: Span
    anchor: int
    similarity: float  # mean cosine of each shared layer's maps with the anchor's
    ppl: float | None = None
    base_ppl: float | None = None
    kv_fraction_saved: float = 0.0

    @property
    def ppl_delta(self) -> float | None:
        return None if self.ppl is None else self.ppl - self.base_ppl

    def to_json(self) -> dict:
        return {
            "span": str(self.span),
            "anchor": self.anchor,
            "similarity": self.similarity,
            "ppl": self.ppl,
            "ppl_delta": self.ppl_delta,
            "kv_fraction_saved": self.kv_fraction_saved,
        }


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    out: Path
    stats: AttentionStatistics
    ranking: list[SpanCandidate]
    searched: list[SpanCandidate]
    span_length: int
    calibration_source: str
    command: str | None
    frontier: list = dataclasses.field(default_factory=list)  # FrontierPoint
    frontier_search: dict | None = None  # frontier.search_frontier's report
    heal_command: str | None = None  # the frontier's pick with fitted maps and corrections
    recommended: object = None  # the FrontierPoint of --kv-saving or --max-penalty

    def lines(self) -> list[str]:
        """What `analyze` prints."""
        lines: list[str] = []
        if self.frontier:
            return self._frontier_lines()
        lines.append(f"{self.out}: similarity.json, similarity.png ({self.stats.num_layers} x {self.stats.num_layers} layers)")
        lines.append(f"calibration: {self.calibration_source}, {self.stats.tokens} tokens")
        lines.append(f"spans of {self.span_length} layers, most similar to their anchor first:")
        for candidate in self.ranking[:10]:
            lines.append(f"  {str(candidate.span):>7}  anchor {candidate.anchor:>3}  similarity {candidate.similarity:.3f}")
        if self.searched:
            base = self.searched[0].base_ppl
            lines.append(f"perplexity search on calibration text (base {base:.2f}):")
            for candidate in self.searched[:3]:
                lines.append(
                    f"  {str(candidate.span):>7}  anchor {candidate.anchor:>3}  ppl {candidate.ppl:.2f} ({candidate.ppl_delta:+.2f})  "
                    f"KV cache -{100 * candidate.kv_fraction_saved:.1f}%"
                )
            lines.append(f"apply the best: {self.command}")
        return lines

    def _frontier_lines(self) -> list[str]:
        first = self.frontier[0]
        texts = list(first.ppl)
        lines = [f"{self.out}: frontier.json, frontier.png, similarity.json, similarity.png",
                 "base ppl: " + ", ".join(f"{t} {first.base_ppl[t]:.2f}" for t in texts)]
        width = max(10, *(len(point.label) for point in self.frontier))
        lines.append(f"{'mode':>{width}} {'KV saved':>8}  " + "  ".join(f"{t + ' penalty':>20}" for t in texts) + "  spans")
        for point in self.frontier:
            cells = "  ".join(f"{100 * point.penalty(t):>+19.1f}%" for t in texts)
            lines.append(f"{point.label:>{width}} {100 * point.kv_fraction_saved:>7.1f}%  {cells}  {' '.join(point.spans)}")
        search = self.frontier_search or {}
        lines.append(f"search took {search.get('seconds', 0):.0f} s on {search.get('device', 'cpu')}: "
                     f"{search.get('plans_searched', 0)} plans on {', '.join(search.get('texts', {}))}")
        lines.append(f"apply: {self.command}" if self.command else "no point asked for (--kv-saving F or --max-penalty P picks one)")
        if self.recommended is not None:
            point = self.recommended
            lines.append("  its penalty: " + ", ".join(
                f"{t} {100 * point.penalty(t):+.1f}%" + (f" ({point.intervals[t].describe()})" if point.intervals.get(t) else "") for t in texts))
        if self.heal_command:
            lines.append(f"heal it: {self.heal_command}")
            lines.append("  (fits the maps with low-rank corrections on the --calib texts: a lower penalty, most on their domains, "
                         "in minutes where a point takes seconds; not measured by this search)")
        return lines


def rank_spans(similarity: np.ndarray, length: int) -> list[SpanCandidate]:
    """Every contiguous span of ``length`` layers with its default anchor, most similar first."""
    layers = similarity.shape[0]
    candidates = []
    for start in range(1, layers - length + 1):
        span = Span(start, start + length - 1)
        anchor = start - 1
        score = float(np.mean([similarity[anchor, layer] for layer in span.layers]))
        candidates.append(SpanCandidate(span, anchor, score, kv_fraction_saved=kv_fraction_saved(length, layers)))
    return sorted(candidates, key=lambda c: -c.similarity)


def span_length_for(request: AnalyzeRequest, num_layers: int) -> int:
    if request.share is not None and request.kv_saving is not None:
        raise UsageError("give --share or --kv-saving, not both")
    if request.kv_saving is not None:
        if not 0 < request.kv_saving < 0.5:
            raise UsageError(f"--kv-saving {request.kv_saving} is out of range: SA saves at most half the KV cache (0 < x < 0.5)")
        return max(1, math.ceil(request.kv_saving * 2 * num_layers))
    length = request.share if request.share is not None else 4
    if not 1 <= length < num_layers:
        raise UsageError(f"--share {length} is out of range: the model has {num_layers} layers; share 1-{num_layers - 1}")
    return length


def save_heatmap(stats: AttentionStatistics, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = stats.num_layers
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 7.5), gridspec_kw={"width_ratios": [1.25, 1]})
    image = left.imshow(stats.layer_similarity(), cmap="viridis", vmin=0, vmax=1, origin="upper")
    left.set_title("Attention similarity between layers\n(cosine of post-softmax maps, mean over heads)")
    left.set_xlabel("layer")
    left.set_ylabel("layer")
    left.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=7, rotation=90)
    left.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    fig.colorbar(image, ax=left, fraction=0.046, pad=0.04)
    adjacent = stats.adjacent_head_similarity()
    image = right.imshow(adjacent, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    right.set_title("Same head, layer i vs layer i+1")
    right.set_xlabel("head")
    right.set_ylabel("layer i")
    right.set_xticks(range(stats.num_heads), [str(h) for h in range(stats.num_heads)], fontsize=7)
    right.set_yticks(range(layers - 1), [str(i) for i in range(layers - 1)], fontsize=7)
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SIMILARITY_FILE = "similarity.json"  # every analysis writes it: what --overwrite recognizes as an earlier one


def analyze(request: AnalyzeRequest) -> AnalysisResult:
    refuse_existing(Path(request.out), request.overwrite)
    _refuse_a_bad_frontier_request(request)
    inputs = (resolve_model(request.model).path, *calib_paths(request.calib_file), *request.other_texts)
    refuse_to_replace(Path(request.out), request.overwrite, SIMILARITY_FILE, inputs)
    source, config, hf_model, tokenizer = load_for_reference(request.model, request.accept_unknown_config_keys)
    length = span_length_for(request, config.num_hidden_layers)
    _, calibration = split_texts(tokenizer, None, request.calib_file, 0, calib_tokens_for(request.calib_tokens))
    with progress_bar("collecting attention maps on calibration text", unit="chunk") as advance:
        stats = collect_statistics(hf_model, calibration.ids, progress=advance)
    ranking = rank_spans(stats.layer_similarity(), length)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        ranking = [c for c in ranking if len({kinds[c.anchor], *(kinds[l] for l in c.span.layers)}) == 1]

    searched: list[SpanCandidate] = []
    command = heal_command = None
    points, report, chosen = [], None, None
    if request.frontier:
        points, report = _frontier(request, source, config, hf_model, tokenizer, stats, calibration)
        chosen = recommend(points, request.kv_saving, request.max_penalty)
        if (request.kv_saving is not None or request.max_penalty is not None) and chosen is None:
            raise UsageError("no plan on the frontier meets the request; raise --max-shared or --max-penalty")
        command = chosen.command(request.model, _calibration_args(request)) if chosen else None
        heal_command = chosen.heal_command(request.model, _calibration_args(request, tokens=False)) if chosen else None
    elif request.share is not None or request.kv_saving is not None:
        ids = calibration.ids[: request.search_tokens]
        with step(f"layer inputs and base perplexity on {len(ids)} calibration tokens"):
            inputs = layer_inputs_of(hf_model, ids, 1024)  # each candidate runs from its first changed layer
            base = perplexity(hf_model, ids, 1024, inputs=inputs)
        pool = ranking[: request.candidates]
        with progress_bar(f"span search: perplexity of {len(pool)} candidates (head map {request.head_map})", unit="span") as advance:
            for number, candidate in enumerate(pool):
                plan = build_plan([candidate.span], config.num_hidden_layers, [candidate.anchor], kinds)
                plan = plan.with_head_maps(calibrate_head_maps(stats, plan, request.head_map, kinds))
                ppl = perplexity(hf_model, ids, 1024, plan, inputs=inputs)
                searched.append(dataclasses.replace(candidate, ppl=ppl, base_ppl=base))
                advance(number + 1, len(pool))
        searched.sort(key=lambda c: c.ppl)
        best = searched[0]
        command = f"sa-export convert {request.model} --span {best.span}"
        if best.anchor != best.span.start - 1:
            command += f" --anchor {best.anchor}"
        if request.head_map != "identity":
            command += f" --head-map {request.head_map}{_calibration_args(request)}"

    with atomic_directory(Path(request.out), request.overwrite) as tmp:
        save_heatmap(stats, tmp / "similarity.png", f"{source.name}: {calibration.source.rsplit('/', 1)[-1]}, {stats.tokens} tokens")
        write_json_atomic(
            tmp / SIMILARITY_FILE,
            {
                "model": source.name,
                "calibration": calibration.to_json(),
                "chunks": stats.chunks,
                "num_layers": stats.num_layers,
                "num_heads": stats.num_heads,
                "layer_similarity": stats.layer_similarity().round(6).tolist(),
                "adjacent_head_similarity": stats.adjacent_head_similarity().round(6).tolist(),
                "span_length": length,
                "ranking": [c.to_json() for c in ranking],
                "search": {"head_map": request.head_map, "tokens": min(len(calibration.ids), request.search_tokens), "results": [c.to_json() for c in searched]},
                "convert_command": command,
            },
        )
        if request.frontier:
            write_json_atomic(tmp / "frontier.json", {
                "model": source.name, "calibration": calibration.to_json(), "search": report,
                "points": [p.to_json() for p in points], "recommended": chosen.to_json() if chosen else None, "convert_command": command,
                "heal_command": heal_command,
            })
            save_plot(points, list(points[0].ppl), tmp / "frontier.png", f"{source.name}: perplexity penalty vs KV cache saved")
    return AnalysisResult(Path(request.out).absolute(), stats, ranking, searched, length, calibration.source, command, points, report, heal_command,
                          recommended=chosen)


def _frontier(request: AnalyzeRequest, source, config, hf_model, tokenizer, stats, calibration):
    """Frontier points searched on the tail of each calibration text, and reported on held-out
    text of the first calibration text's domain and on text of a domain the search never reads."""
    if request.share is not None:
        raise UsageError("--frontier searches every number of shared layers; pick a point with --kv-saving or --max-penalty, not --share")
    import torch

    if torch.cuda.is_available():  # the search is hundreds of forward passes: use the GPU where there is one
        hf_model.to("cuda")
    files, paths = _calib_paths(request)
    search, evaluation = {}, None
    for file, path in zip(files, paths):
        # The head of the first text is held out; every search text is a tail, checked not to overlap it.
        held_out, tail = split_texts(tokenizer, files[0], file, request.eval_tokens, calib_tokens_for(request.calib_tokens))
        evaluation = evaluation or held_out
        ids = tail.ids[: request.search_tokens]
        search[f"search:{path.name}"] = TokenText(ids, f"{tail.source}, the first {len(ids)}")
    others = other_domain_texts(tokenizer, request.other_texts, paths, request.eval_tokens)
    # The first keeps the name "other-domain" that --max-penalty and readers of frontier.json know.
    texts = {"calib-domain": evaluation}
    for index, text in enumerate(others):
        name = _other_name(index, text)
        texts[name if name not in texts else f"{name} ({index + 1})"] = text  # two files of one name in two folders
    return search_frontier(hf_model, config, stats, search, texts, list(request.frontier_modes), request.max_shared,
                           request.search_pool or DEFAULT_POOL, request.search_cost, request.frontier_units)


def _calibration_args(request: AnalyzeRequest, tokens: bool = True) -> str:
    """The --calib and --calib-tokens the maps were calibrated with, for the convert command:
    calibrated maps converted from other text would not be the maps measured here. Without
    ``tokens``, the files alone: a fit with corrections reads more text by default than a search."""
    import shlex

    args = "".join(f" --calib {shlex.quote(str(Path(file).absolute()))}" for file in _calib_paths(request)[0] if file)
    return args + (f" --calib-tokens {request.calib_tokens}" if tokens and request.calib_tokens else "")


def _calib_paths(request: AnalyzeRequest) -> tuple[list, list[Path]]:
    files = list(request.calib_file) if isinstance(request.calib_file, tuple) else [request.calib_file]
    return files, calib_paths(request.calib_file)


def _refuse_a_bad_frontier_request(request: AnalyzeRequest) -> None:
    if not request.frontier:
        if request.other_texts:
            raise UsageError("--other-text judges the frontier's plans; give it with --frontier")
        return
    searchable = [mode for mode in HEAD_MAP_MODES if mode not in FITTED_MODES]
    unknown = [mode for mode in request.frontier_modes if mode not in searchable]
    if unknown or not request.frontier_modes:
        raise UsageError(f"--frontier-maps {','.join(request.frontier_modes)}: choose among {', '.join(searchable)} "
                         "(fit is fitted through the model: convert the plan the frontier picks with --head-map fit)")
    # Checked before the model loads and the statistics are collected, so that a bad path costs seconds.
    if any(name.lower() == "none" for name in request.other_texts):
        raise UsageError("--other-text none: the frontier reports every plan on a domain its search never reads; give a file or default")
    other_text_files(request.other_texts, _calib_paths(request)[1])


def _other_name(index: int, text: TokenText) -> str:
    """The frontier's name of its ``index``-th other-domain text: other-domain, then other-domain:FILE."""
    return "other-domain" if index == 0 else f"other-domain:{Path(text.file).name}"

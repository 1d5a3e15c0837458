"""Perplexity of the base model and of its SA version (PyTorch reference) on the same text."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from sa_export.accuracy.calibration import FIT_START, FITTED_MODES, AttentionStatistics, calibrate_head_maps, collect_statistics
from sa_export.accuracy.output_maps import output_errors, output_head_maps
from sa_export.accuracy.distill import FIT_STEPS, default_fit_steps, fit_maps_and_temperatures
from sa_export.accuracy.layer_inputs import LayerInputs, first_changed_layer
from sa_export.core.architectures import ModelShape
from sa_export.core.errors import UsageError
from sa_export.hf.models import load_config, load_reference, resolve_model
from sa_export.core.plan import SharingPlan, build_plan
from sa_export.core.progress import progress_bar, step
from sa_export.accuracy.texts import TokenText, calib_files_for, calib_paths, calib_tokens_for, other_domain_texts, split_texts
from sa_export.accuracy.intervals import PenaltyInterval, describe, penalty_interval
from sa_export.accuracy.reference import shared_attention


def perplexity(
    model, token_ids: list[int], context: int, plan: SharingPlan | None = None, log_temperatures=None, shared_heads=None,
    inputs: LayerInputs | None = None,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``context`` tokens
    (``log_temperatures``, ``shared_heads``: see ``reference.shared_attention``).
    ``inputs``: the base model's layer inputs on these windows (``layer_inputs_of``), so
    that the layers below the plan's first run once, not once per plan."""
    return perplexity_of(token_nlls(model, token_ids, context, plan, log_temperatures, shared_heads, inputs))


@torch.no_grad()
def token_nlls(
    model, token_ids: list[int], context: int, plan: SharingPlan | None = None, log_temperatures=None, shared_heads=None,
    inputs: LayerInputs | None = None,
) -> torch.Tensor:
    """The next-token NLL of every predicted token (fp32, CPU), window after window, as
    ``perplexity`` reads them (``intervals.penalty_interval`` pairs two models' losses)."""
    losses = []
    first = first_changed_layer(plan)
    with shared_attention(model, plan, log_temperatures=log_temperatures, shared_heads=shared_heads):
        for index, window in enumerate(_windows(model, token_ids, context)):
            logits = (inputs.run(index, window, first)[0] if inputs is not None else model(input_ids=window)).logits[0, :-1].float()
            targets = window[0, 1:].to(logits.device)
            losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
    return torch.cat(losses)


def copied_tokens(token_ids: list[int], context: int) -> torch.Tensor:
    """For each token ``token_nlls`` scores, whether its window already held the pair it
    ends (the token before it and itself): a token a model can predict by copying."""
    flags = []
    for start in range(0, len(token_ids) - 1, context):
        window, seen = token_ids[start : start + context], set()
        for pair in zip(window, window[1:]):
            flags.append(pair in seen)
            seen.add(pair)
    return torch.tensor(flags, dtype=torch.bool)


def perplexity_of(nlls: torch.Tensor) -> float:
    return math.exp(float(nlls.double().mean()))


@torch.no_grad()
def base_log_probs(model, token_ids: list[int], context: int) -> list[torch.Tensor]:
    """The base model's next-token log-probabilities per window of ``context`` tokens
    (fp32: in fp16 their rounding alone is a divergence as large as a small plan's)."""
    with shared_attention(model, None):
        return [torch.log_softmax(model(input_ids=w).logits[0].float(), -1) for w in _windows(model, token_ids, context)]


@torch.no_grad()
def divergence(
    model, token_ids: list[int], context: int, base: list[torch.Tensor], plan: SharingPlan, shared_heads=None, inputs: LayerInputs | None = None,
) -> float:
    """Mean KL(base || SA) per token: how far the plan moves the model's next-token
    distribution, whichever token the text has next (a perplexity change can also fall,
    where the SA model happens to predict the text better). benchmarks.group_units ranks
    plans by either. ``inputs``: as for ``perplexity``."""
    total, count = 0.0, 0
    first = first_changed_layer(plan)
    with shared_attention(model, plan, shared_heads=shared_heads):
        for index, (window, teacher) in enumerate(zip(_windows(model, token_ids, context), base)):
            output = inputs.run(index, window, first)[0] if inputs is not None else model(input_ids=window)
            student = torch.log_softmax(output.logits[0].float(), -1)
            total += float((teacher.exp() * (teacher - student)).sum())
            count += teacher.shape[0]
    return total / count


def layer_inputs_of(model, token_ids: list[int], context: int) -> LayerInputs:
    """The base model's input to every layer on the windows ``perplexity`` reads."""
    return LayerInputs.of_windows(model, list(_windows(model, token_ids, context)), range(model.config.num_hidden_layers))


def _windows(model, token_ids: list[int], context: int):
    """Non-overlapping windows of ``context`` tokens (of at least 2) as [1, n] tensors on the model's device."""
    for start in range(0, len(token_ids) - 1, context):
        window = torch.tensor([token_ids[start : start + context]], device=model.device)
        if window.shape[1] < 2:
            break
        yield window


@dataclasses.dataclass(frozen=True)
class EvalResult:
    model: str
    plan: SharingPlan
    head_map: str
    base_ppl: float
    sa_ppl: float
    evaluation: TokenText
    calibration: TokenText | None
    context: int
    kv_fraction_saved: float
    tasks: dict = dataclasses.field(default_factory=dict)
    precision: str = "fp32"
    others: tuple[dict, ...] = ()  # the same on texts of other domains: source, tokens, base_ppl, sa_ppl, penalty_interval
    interval: PenaltyInterval | None = None  # how sure the penalty is on this text (accuracy.intervals)
    corrections: dict | None = None  # LoRA corrections fitted with the maps: rank, corrects, parameters

    @property
    def eval_tokens(self) -> int:
        return len(self.evaluation.ids)

    @property
    def delta(self) -> float:
        return self.sa_ppl - self.base_ppl

    def lines(self) -> list[str]:
        """What `eval` prints."""
        lines: list[str] = []
        lines.append(f"eval text     {self.evaluation.source} (windows of {self.context})")
        if self.calibration is not None:
            lines.append(f"calib text    {self.calibration.source}")
        lines.append(f"plan          {self.plan.describe()}, head map {self.head_map}")
        if self.plan.head_maps:
            lines.append(f"maps read     {self._map_sources_text()}")
        if self.corrections is not None:
            fix = self.corrections
            lines.append(f"corrections   rank {fix['rank']} of {len(fix['corrects'])} projections ({fix['parameters']:,} numbers)")
        if self.precision != "fp32":
            lines.append(f"weights       {self.precision}: the builder's {self.precision} graph's, dequantized (both models)")
        lines.append(f"base ppl      {self.base_ppl:.3f}")
        lines.append(f"SA ppl        {self.sa_ppl:.3f}")
        lines.append(
            f"delta         {self.delta:+.3f} ({100 * (self.sa_ppl / self.base_ppl - 1):+.1f}%) "
            f"for {100 * self.kv_fraction_saved:.1f}% less KV cache"
        )
        lines.append(f"              {describe(self.interval)}")
        for other in self.others:
            lines.append(f"other domain  {other['source']}")
            lines.append(
                f"              base ppl {other['base_ppl']:.3f}, SA ppl {other['sa_ppl']:.3f}, "
                f"delta {other['sa_ppl'] - other['base_ppl']:+.3f} ({100 * (other['sa_ppl'] / other['base_ppl'] - 1):+.1f}%)"
            )
            interval = other["penalty_interval"]
            lines.append(f"              {describe(PenaltyInterval.from_json(interval) if interval is not None else None)}")
        for task, sides in self.tasks.items():
            for metric in sorted(sides.get("base", {})):
                if "stderr" not in metric:
                    lines.append(f"{task} {metric:12s} base {sides['base'][metric]:.4f}  SA {sides['sa'].get(metric, float('nan')):.4f}")
        return lines

    def map_sources(self) -> dict[int, tuple[int, ...]]:
        """The layers each shared layer's head map reads (a partly shared one's kept heads among them)."""
        return {layer: self.plan.sources_of(layer) for layer in self.plan.shared_layers if self.plan.head_map(layer) is not None}

    def _map_sources_text(self) -> str:
        partly = set(self.plan.shared_groups)
        named = lambda layer: f"{layer} (kept heads)" if layer in partly else str(layer)  # noqa: E731
        return "; ".join(f"{layer} <- {', '.join(map(named, sources))}" for layer, sources in self.map_sources().items())

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "map_sources": {str(k): list(v) for k, v in self.map_sources().items()},
            "shared_layers": list(self.plan.shared_layers),
            "shared_groups": {str(k): list(v) for k, v in self.plan.shared_groups.items()},  # partly shared layers' KV groups
            "anchors": {str(k): v for k, v in self.plan.anchors.items()},
            "head_map": self.head_map,
            "base_ppl": self.base_ppl,
            "sa_ppl": self.sa_ppl,
            "ppl_delta": self.delta,
            "ppl_ratio": self.sa_ppl / self.base_ppl,
            "eval_tokens": self.eval_tokens,
            "calib_tokens": len(self.calibration.ids) if self.calibration else 0,
            "context": self.context,
            "eval_text": self.evaluation.source,
            "calib_text": self.calibration.source if self.calibration else None,
            "kv_fraction_saved": self.kv_fraction_saved,
            "tasks": self.tasks,
            "precision": self.precision,
            "penalty_interval": self.interval.to_json() if self.interval else None,
            "other_domain": self.others[0] if self.others else None,  # the first of other_domains
            "other_domains": list(self.others),
            "corrections": self.corrections,
        }


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    model: str
    spans: tuple[str, ...]
    anchors: tuple[int, ...] = ()
    head_map: str = "identity"
    text_file: str | None = None
    calib_file: str | None = None
    max_tokens: int = 4096
    calib_tokens: int | None = None  # None: texts.calib_tokens_for's default
    context: int = 1024
    force: bool = False
    tasks: tuple[str, ...] = ()
    tasks_path: str | None = None
    tasks_limit: int | None = None
    accept_unknown_config_keys: bool = False
    precision: str = "fp32"  # int4: the weights of the builder's int4 graph, dequantized
    other_texts: tuple[str, ...] = ()  # texts of other domains; ("none",): skip; (): texts.other_domain_for's default
    fit_steps: int | None = None  # None: distill.default_fit_steps
    lora_rank: int = 0  # with head map fit: LoRA corrections of the shared layers (accuracy.adapters)


def load_for_reference(model: str, accept_unknown_config_keys: bool = False):
    """The HF model and tokenizer behind MODEL, for commands that run the PyTorch reference."""
    source = resolve_model(model)
    if source.kind != "hf":
        raise UsageError("this command runs the PyTorch reference: give a Hugging Face model directory or alias, not ONNX")
    config = load_config(source, accept_unknown_config_keys)
    hf_model, tokenizer = load_reference(source)
    if tokenizer is None:
        raise UsageError(f"{source.name} has no tokenizer; this command needs one to read text")
    return source, config, hf_model, tokenizer


def calibrated_plan(
    hf_model, plan: SharingPlan, mode: str, calibration: TokenText, layer_kinds=None, stats: AttentionStatistics | None = None,
    fit_steps: int = FIT_STEPS, adapters=None,
) -> SharingPlan:
    """The plan with head maps calibrated on ``calibration`` (unchanged for identity);
    ``stats``, when given, are that text's attention statistics, collected before.
    ``adapters`` (``accuracy.adapters.LowRankAdapters``, mode fit only) are fitted with the
    maps, after they take in the Q/K projections of the layers the start maps read."""
    if adapters is not None and mode not in FITTED_MODES:
        raise UsageError(f"LoRA corrections are fitted with the maps by distillation: use --head-map fit, not {mode}")
    if mode == "identity" or not plan.anchors:
        return plan
    if mode == "argmax-out":
        with progress_bar("choosing anchor heads by their output error", unit="chunk") as advance:
            return plan.with_head_maps(output_head_maps(output_errors(hf_model, plan, calibration.ids, progress=advance), plan))
    if stats is None:
        with progress_bar("calibrating head maps", unit="chunk") as advance:
            stats = collect_statistics(hf_model, calibration.ids, progress=advance)
    if mode not in FITTED_MODES:
        return plan.with_head_maps(calibrate_head_maps(stats, plan, mode, layer_kinds))
    start = calibrate_head_maps(stats, plan, FIT_START, layer_kinds)
    if adapters is not None:
        adapters.add_sources(hf_model, plan.with_head_maps(start))
    with progress_bar(f"fitting head maps on the model's output ({fit_steps} steps)", unit="step") as advance:
        return plan.with_head_maps(fit_maps_and_temperatures(hf_model, plan, calibration.ids, start, fit_steps, advance, adapters=adapters)[0])


def evaluate(request: EvalRequest) -> EvalResult:
    source, config, hf_model, tokenizer = load_for_reference(request.model, request.accept_unknown_config_keys)
    kinds = getattr(config, "layer_types", None)
    plan = build_plan(list(request.spans), config.num_hidden_layers, list(request.anchors), kinds, request.force, **ModelShape.from_config(config).head_groups)
    calib_files = calib_files_for(request.calib_file, request.lora_rank)
    evaluation, calibration = split_texts(tokenizer, request.text_file, calib_files, request.max_tokens, calib_tokens_for(request.calib_tokens, request.lora_rank))
    if len(evaluation.ids) < 2:
        raise UsageError("the evaluation text has fewer than 2 tokens")
    # Read before the fit, so that a wrong path fails in seconds, not after minutes of fitting.
    other_texts = other_domain_texts(tokenizer, request.other_texts, calib_paths(calib_files) if request.head_map != "identity" else [], request.max_tokens)
    adapters = None
    if request.lora_rank:
        from sa_export.accuracy.adapters import LowRankAdapters

        adapters = LowRankAdapters(hf_model, plan.shared_layers, request.lora_rank)
    quantized = request.precision != "fp32"
    if quantized and adapters is None:
        _load_quantized_weights(source, hf_model, request)
    plan = calibrated_plan(hf_model, plan, request.head_map, calibration, kinds, fit_steps=request.fit_steps or default_fit_steps(bool(request.lora_rank)), adapters=adapters)
    sa_model = hf_model
    corrected = adapters.active if adapters is not None else contextlib.nullcontext  # the SA model only: base stays the user's
    if quantized and adapters is not None:  # as convert does: fitted in fp32, folded, then quantized
        sa_model, corrected = _corrected_quantized(source, hf_model, tokenizer, adapters, request), contextlib.nullcontext
        _load_quantized_weights(source, hf_model, request)
    ids = evaluation.ids
    with step(f"perplexity of the base model on {len(ids)} tokens"):
        base = token_nlls(hf_model, ids, request.context)
    with step(f"perplexity of the SA model ({plan.describe()}, head map {request.head_map})"), corrected():
        sa = token_nlls(sa_model, ids, request.context, plan)
    others = []
    for text in other_texts:
        with step(f"perplexity of both on text of another domain ({len(text.ids)} tokens of {text.file})"):
            other_base = token_nlls(hf_model, text.ids, request.context)
            with corrected():
                other_sa = token_nlls(sa_model, text.ids, request.context, plan)
        others.append(_other_report(text, other_base, other_sa))
    tasks = {}
    if request.tasks:
        if adapters is not None:
            raise UsageError("--tasks runs the base and SA models in one harness call; it does not take --lora-rank")
        from sa_export.accuracy.tasks import run_tasks

        with step(f"lm-evaluation-harness: {', '.join(request.tasks)} (base and SA)"):
            tasks = run_tasks(hf_model, tokenizer, plan, list(request.tasks), request.tasks_path, request.tasks_limit)
    saved = plan.kv_fraction_saved
    used_calibration = request.head_map != "identity"
    return EvalResult(
        source.name, plan, request.head_map, perplexity_of(base), perplexity_of(sa), evaluation, calibration if used_calibration else None,
        request.context, saved, tasks, request.precision, tuple(others), interval=penalty_interval(base, sa),
        corrections=adapters.record() if adapters is not None else None,
    )


def _other_report(text: TokenText, base: torch.Tensor, sa: torch.Tensor) -> dict:
    """An entry of other_domains: both perplexities on ``text`` and how sure their penalty is."""
    interval = penalty_interval(base, sa)
    return {
        "source": text.source, "tokens": len(text.ids), "base_ppl": perplexity_of(base), "sa_ppl": perplexity_of(sa),
        "penalty_interval": interval.to_json() if interval else None,
    }


def _corrected_quantized(source, hf_model, tokenizer, adapters, request: EvalRequest):
    """A copy of ``hf_model`` with the corrections folded and then the builder's quantized
    weights of that corrected checkpoint: what `convert --lora-rank --precision int4` ships."""
    import copy
    import tempfile
    from pathlib import Path

    from sa_export.accuracy.adapters import save_corrected_checkpoint

    corrected = copy.deepcopy(hf_model)
    adapters.fold(corrected)
    with tempfile.TemporaryDirectory(prefix="sa-export-eval-") as work:
        _load_quantized_weights(save_corrected_checkpoint(corrected, tokenizer, Path(work) / "corrected", source.name), corrected, request)
    return corrected


def _load_quantized_weights(source, hf_model, request: EvalRequest) -> None:
    """Give ``hf_model`` the weights of the unshared graph the builder makes at the requested
    precision, so that both perplexities are those of the quantized model (its weights;
    the int8 activations of ONNX Runtime's accuracy_level 4 are not modelled)."""
    import tempfile
    from pathlib import Path

    from sa_export.accuracy.quantized import load_graph_weights
    from sa_export.export import ExportOptions, get_exporter

    exporter = get_exporter("genai")
    if request.precision not in exporter.precisions:
        raise UsageError(f"eval --precision {request.precision}: the builder's graphs are {', '.join(exporter.precisions)}")
    options = ExportOptions(request.precision, accept_unknown_config_keys=request.accept_unknown_config_keys)
    with tempfile.TemporaryDirectory(prefix="sa-export-eval-") as work:
        with step(f"the builder's {request.precision} weights ({exporter.describe(options)})"):
            export_dir = Path(work) / "export"
            model = exporter.export(source, options, export_dir)  # loaded once, by the exporter
            load_graph_weights(hf_model, model.graph, SharingPlan(hf_model.config.num_hidden_layers, {}), export_dir)

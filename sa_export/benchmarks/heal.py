"""Does fitting on two domains, or adapting the shared layers' own weights, hold on a third?

    python -m sa_export.benchmarks.heal [--spans 26-29,25-25+27-29,...] [--configs identity|fit,...] [--rank 8] [--fit-steps N] [--extra-source-layers N]
        [--adapter-learning-rates R,...] [--adapter-weight-decay D] [--hidden-weight W] [--soft-target-temperature T] [--correction-scales S,...] [--seeds N,...]
        [--fit-temperature] [--calib-tokens N] [--chunk-tokens N --chunks-per-step N] [--more-texts FILE,...] [--copy-breakdown] [--json FILE]

For each span, side by side, from the same `mix-few` start:

- ``fit``: the `fit` head maps, distilled on news (as `--head-map fit` does);
- ``fit-2``: the same, distilled on news and Python source, half each;
- ``fit-2+lora``: with them, a rank-r correction of each shared layer's V and output
  projections (``accuracy.adapters``), which folds into those weights;
- ``fit+lora``: the same correction, distilled on news only;
- ``fit-3+lora``: ``fit-2+lora`` distilled on news, Python source and English prose about
  Python (the language reference's topics that pydoc ships), a third of each;
- ``fit-2s+lora``: ``fit-2+lora`` distilled on news, Python source and text the model
  samples itself from the start of a document (``texts.sampled_tokens``), a third of each;
- ``fit-2w+lora``: ``fit-2+lora`` distilled also on Wikipedia articles (the dump's tokens
  after its evaluation head), a third of each. Wiki is then a domain the fit reads: judge
  this config on ``--more-texts``, text of a fourth domain.
- ``fit-2r+lora``: ``fit-2+lora`` distilled also on the same two texts rearranged so that
  each chunk's second half copies spans of its first (``texts.repeated_tokens``), a third
  of the whole: the repetition a licence or an article has, in the fit's own domains.

Each is judged on held-out news, held-out Python source (the head of the file whose tail
``fit-2`` fits), Wikipedia articles in wiki markup, a domain that no fit but ``fit-2w+lora``
reads, and the head of each ``--more-texts`` file.
Each penalty is printed with its 95% interval in brackets (``accuracy.intervals``: the
base model's and the config's losses on the same tokens, paired) and the fraction of
identity's penalty it is.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import NamedTuple

from sa_export.accuracy.adapters import MLP_PROJECTIONS, PROJECTIONS, SOURCE_PROJECTIONS, LowRankAdapters
from sa_export.accuracy.calibration import EXTRA_SOURCE_LAYERS, FIT_START, calibrate_head_maps, collect_statistics
from sa_export.accuracy.distill import ADAPTER_LEARNING_RATE, FIT_CHUNK_TOKENS, FIT_CHUNKS_PER_STEP, FIT_STEPS, fit_maps_and_temperatures
from sa_export.accuracy.evaluate import copied_tokens, load_for_reference, perplexity_of, token_nlls
from sa_export.accuracy.intervals import penalty_interval
from sa_export.accuracy.texts import CALIB_TOKENS, documentation_tokens, other_domain_tokens, repeated_tokens, sampled_tokens, other_domain_text_path, split_texts, unseen_domain_tail, unseen_domain_tokens
from sa_export.core.atomic import write_json_atomic
from sa_export.core.plan import HeadMap, build_plan

WINDOW = 1024
CONFIGS = ("fit", "fit-2", "fit-2+lora", "fit+lora", "fit-3+lora", "fit-2s+lora", "fit-2w+lora", "fit-2r+lora")
CALIBRATION_OF = {"fit-3": "three", "fit-2s": "sampled", "fit-2w": "wiki", "fit-2r": "repeats", "fit-2": "both"}  # by the config's first matching prefix; else news


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", default="26-29", help="plans, comma-separated; a plan of several spans joins them with + (25-25+27-29)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated; identity alone measures each plan without a fit")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--projections", default=",".join(PROJECTIONS), help=f"which of each shared layer's projections +lora corrects (MLP: {','.join(MLP_PROJECTIONS)})")
    parser.add_argument("--source-projections", help=f"also correct these projections of every layer the maps read (convert and eval: {','.join(SOURCE_PROJECTIONS)})")
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    parser.add_argument("--extra-source-layers", type=int, default=EXTRA_SOURCE_LAYERS, help="layers besides the anchor whose heads the maps read (mix-few's start)")
    parser.add_argument("--adapter-learning-rates", default=str(ADAPTER_LEARNING_RATE), help="+lora configs: fit once at each of these rates (comma-separated)")
    parser.add_argument("--adapter-weight-decay", type=float, default=0.0, help="+lora configs: AdamW's decay of the corrections toward none")
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden states' distance from the base model's in the fit's loss (0: the divergence alone)")
    parser.add_argument("--soft-target-temperature", type=float, default=1.0, help="flatten the teacher's and the SA model's distributions by this in the fit's divergence")
    parser.add_argument("--fit-temperature", action="store_true", help="also fit a temperature per shared head (reference.mix_probs) and judge with it")
    parser.add_argument("--correction-scales", default="1", help="+lora configs: judge the fit with its corrections at each of these multiples (comma-separated)")
    parser.add_argument("--seeds", default="0", help="fit once from each seed (the corrections' start, the chunks' order); with several, judge their mean too")
    parser.add_argument("--chunk-tokens", type=int, default=FIT_CHUNK_TOKENS, help="tokens of each chunk the fit reads (the evaluation's windows are 1024)")
    parser.add_argument("--chunks-per-step", type=int, default=FIT_CHUNKS_PER_STEP)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each evaluation text")
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, help="tokens of each calibration text (news, code, documentation)")
    parser.add_argument("--unseen-text", help="text of the third domain (default: gensim's Wikipedia excerpt)")
    parser.add_argument("--more-texts", default="", help="more evaluation texts, comma-separated files (each named by its file name)")
    parser.add_argument("--copy-breakdown", action="store_true", help="also print, per text, the share of the penalty on tokens its window already held after the same token (copyable)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if min(args.chunk_tokens, args.chunks_per_step, args.fit_steps) < 1:
        parser.error("--chunk-tokens, --chunks-per-step and --fit-steps must be at least 1")
    if min(args.hidden_weight, args.adapter_weight_decay, args.extra_source_layers) < 0:
        parser.error("--hidden-weight, --adapter-weight-decay and --extra-source-layers must be at least 0")
    if args.soft_target_temperature <= 0:
        parser.error("--soft-target-temperature must be above 0")
    try:
        scales = [float(scale) for scale in args.correction_scales.split(",")]
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--correction-scales and --seeds take comma-separated numbers, not {args.correction_scales!r} and {args.seeds!r}")
    more_texts = [file for file in args.more_texts.split(",") if file]
    if missing := [file for file in more_texts if not Path(file).is_file()]:
        parser.error(f"--more-texts: no file {', '.join(missing)}")
    configs = [name for name in args.configs.split(",") if name != "identity"]  # identity is always measured; alone, it is all
    if unknown := sorted(set(configs) - set(CONFIGS)):
        parser.error(f"unknown configs {', '.join(unknown)}: choose from identity, {', '.join(CONFIGS)}")

    _, config, model, tokenizer = load_for_reference(args.model)
    news, news_calib = split_texts(tokenizer, None, None, args.tokens, args.calib_tokens)
    code_file = other_domain_text_path()
    code, code_calib = split_texts(tokenizer, code_file, code_file, args.tokens, args.calib_tokens)
    texts = {"news": news.ids, "code": code.ids, "wiki": unseen_domain_tokens(tokenizer, args.unseen_text, args.tokens).ids}
    for file in more_texts:
        texts[Path(file).name] = other_domain_tokens(tokenizer, file, args.tokens).ids
    calibration = {"news": news_calib.ids, "both": news_calib.ids + code_calib.ids}
    rates = [float(rate) for rate in args.adapter_learning_rates.split(",")]
    if any(name.startswith("fit-3") for name in configs):
        calibration["three"] = calibration["both"] + documentation_tokens(tokenizer, args.calib_tokens).ids
    if any(name.startswith("fit-2s") for name in configs):
        calibration["sampled"] = calibration["both"] + sampled_tokens(model, args.calib_tokens).ids
    if any(name.startswith("fit-2w") for name in configs):
        calibration["wiki"] = calibration["both"] + unseen_domain_tail(tokenizer, None, args.tokens, args.calib_tokens).ids
    if any(name.startswith("fit-2r") for name in configs):
        calibration["repeats"] = calibration["both"] + repeated_tokens(calibration["both"], args.calib_tokens, args.chunk_tokens).ids
    stats = {name: collect_statistics(model, ids) for name, ids in calibration.items()} if configs else {}
    copied = {name: copied_tokens(ids, WINDOW) for name, ids in texts.items()} if args.copy_breakdown else None
    base = {name: token_nlls(model, ids, WINDOW) for name, ids in texts.items()}  # per-token losses: the intervals pair them
    print("base ppl " + ", ".join(f"{name} {perplexity_of(nlls):.2f}" for name, nlls in base.items()), flush=True)
    rows = []
    for span in args.spans.split(","):
        plan = build_plan(span.split("+"), config.num_hidden_layers)  # 25-25+27-29: two spans, each with its anchor
        identity = {name: token_nlls(model, ids, WINDOW, plan) for name, ids in texts.items()}
        _report(rows, span, "identity", identity, base, identity, 0.0, 0, copied)

        def _judge(named: str, fit: _Fit, scale: float) -> None:
            with _corrected(fit.adapters, scale):
                nlls = {text: token_nlls(model, ids, WINDOW, plan.with_head_maps(fit.maps), fit.log_temperatures) for text, ids in texts.items()}
            _report(rows, span, named, nlls, base, identity, fit.seconds, fit.adapters.parameter_count() if fit.adapters is not None else 0, copied)

        runs = [(name, rate) for name in configs for rate in (rates if name.endswith("+lora") else [ADAPTER_LEARNING_RATE])]
        for name, rate in runs:
            label = name if rate == ADAPTER_LEARNING_RATE else f"{name} lr {rate:g}"
            on = next((text for prefix, text in CALIBRATION_OF.items() if name.startswith(prefix)), "news")
            start = calibrate_head_maps(stats[on], plan, FIT_START, extra_source_layers=args.extra_source_layers)
            print(f"  {span} {label}: the shared layers read layers {list(plan.with_head_maps(start).anchor_layers)}", flush=True)
            fits = []
            for seed in seeds:
                named = label if len(seeds) == 1 else f"{label} seed {seed}"
                adapters = None
                if name.endswith("+lora"):
                    adapters = LowRankAdapters(model, plan.shared_layers, args.rank, seed=seed, projections=args.projections.split(","))
                    if args.source_projections:
                        adapters.add_sources(model, plan.with_head_maps(start), args.source_projections.split(","))
                started = time.perf_counter()
                maps, log_temperatures = fit_maps_and_temperatures(
                    model, plan, calibration[on], start, args.fit_steps, temperature=args.fit_temperature, adapters=adapters, adapter_learning_rate=rate,
                    chunk_tokens=args.chunk_tokens, chunks_per_step=args.chunks_per_step, adapter_weight_decay=args.adapter_weight_decay,
                    hidden_weight=args.hidden_weight, soft_target_temperature=args.soft_target_temperature, seed=seed,
                    on_validate=lambda step, divergence: print(f"  {span} {named} step {step}: held-out KL {divergence:.5f}", flush=True),
                )
                fits.append(_Fit(maps, adapters, time.perf_counter() - started, log_temperatures))
                for scale in scales if adapters is not None else [1.0]:
                    _judge(named if scale == 1.0 else f"{named} x{scale:g}", fits[-1], scale)
            if len(fits) > 1:  # the mean of the fits' maps and of their corrections: one graph, as cheap as each
                corrections = LowRankAdapters.averaged([fit.adapters for fit in fits]) if name.endswith("+lora") else None
                soup = _Fit(_average_maps([fit.maps for fit in fits]), corrections, sum(fit.seconds for fit in fits), _average_temperatures([fit.log_temperatures for fit in fits]))
                _judge(f"{label} soup of {len(fits)}", soup, 1.0)
    if args.json:
        options = {**vars(args), "correction_scales": scales, "seeds": seeds}  # every option as parsed, so a row says how it was fitted
        write_json_atomic(args.json, {"base": {name: perplexity_of(nlls) for name, nlls in base.items()}, **options, "rows": rows})


class _Fit(NamedTuple):
    """One fit's maps and corrections (None without +lora), the seconds it took, and its
    per-head log-temperatures (None unless --fit-temperature)."""

    maps: dict[int, HeadMap]
    adapters: LowRankAdapters | None
    seconds: float
    log_temperatures: dict | None = None


@contextlib.contextmanager
def _corrected(adapters: LowRankAdapters | None, scale: float):
    """The fit's corrections at ``scale`` times their size, when there are any."""
    if adapters is None:
        yield
        return
    with adapters.scaled(scale), adapters.active():
        yield


def _average_maps(fits: list[dict[int, HeadMap]]) -> dict[int, HeadMap]:
    """Per shared layer and head, the mean of the fits' weights (one start, so the same sources)."""
    return {
        layer: HeadMap(head_map.sources, tuple(tuple(sum(w) / len(fits) for w in zip(*heads)) for heads in zip(*(fit[layer].weights for fit in fits))))
        for layer, head_map in fits[0].items()
    }


def _average_temperatures(fits: list[dict | None]) -> dict | None:
    """Per shared layer, the mean of the fits' log-temperatures (None when none were fitted)."""
    if fits[0] is None:
        return None
    return {layer: sum(fit[layer] for fit in fits) / len(fits) for layer in fits[0]}


def _report(rows: list, span: str, name: str, nlls: dict, base: dict, identity: dict, seconds: float, parameters: int, copied: dict | None = None) -> None:
    """Add and print one row: per text, perplexity, penalty with its 95% interval, and the
    fraction of identity's penalty; ``nlls``, ``base`` and ``identity`` map text to per-token losses.
    With ``copied`` (text to ``copied_tokens``), a line of where the penalty falls."""
    row = {"span": span, "config": name, "fit_s": seconds, "adapter_parameters": parameters, "texts": {}}
    cells = []
    for text, losses in nlls.items():
        value, base_ppl, identity_ppl = perplexity_of(losses), perplexity_of(base[text]), perplexity_of(identity[text])
        penalty = value - base_ppl
        of_identity = penalty / (identity_ppl - base_ppl) if identity_ppl != base_ppl else None
        interval = penalty_interval(base[text], losses)
        row["texts"][text] = {"ppl": value, "penalty_percent": 100 * penalty / base_ppl, "of_identity": of_identity,
                              "penalty_interval": interval.to_json() if interval is not None else None}
        cells.append(f"{text} {value:.2f} ({100 * penalty / base_ppl:+.1f}%{'' if interval is None else ' ' + interval.brackets()}, "
                     f"{'-' if of_identity is None else format(of_identity, '.2f')})")
    rows.append(row)
    print(f"{span} {name:>11}: {'  '.join(cells)}  [{seconds:.0f} s]", flush=True)
    if copied is not None:
        parts = []
        for text, losses in nlls.items():
            split = _penalty_on(copied[text], (losses - base[text]).double())
            row["texts"][text]["copied_tokens"] = split
            parts.append(f"{text} {split['share_of_tokens']:.0%} of tokens, {split['share_of_penalty']:.0%} of the penalty "
                         f"({split['mean_copied']:+.3f} nats a copied token, {split['mean_other']:+.3f} another)")
        print(f"{'':>{len(span) + 13}}copied: {'; '.join(parts)}", flush=True)


def _penalty_on(copied, change) -> dict:
    """The share of tokens ``copied`` marks, the share of the summed loss ``change`` on them,
    and the mean change on them and on the rest."""
    return {"share_of_tokens": float(copied.double().mean()), "share_of_penalty": float(change[copied].sum() / change.sum()),
            "mean_copied": float(change[copied].mean()), "mean_other": float(change[~copied].mean())}


if __name__ == "__main__":
    main()

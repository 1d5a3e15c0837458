"""Does a finer unit of sharing than a layer pay? KV groups against whole layers, side by side.

    python -m sa_export.benchmarks.group_units [--mode mix] [--criterion ppl|kl] [--search cheapest|forward]
        [--unit layer|kv-group|both] [--units 1,2,3,4] [--search-tokens 2048] [--min-layer L] [--search-texts news,code]
        [--fit] [--json FILE]

A KV group's K cache can go when every query head of that group borrows its
probabilities: one group of a layer with G KV heads is 1/G of that layer's K cache. For
the same bytes saved, k whole layers are compared with the k*G cheapest KV groups.

Every unit is shared alone and its cost measured on calibration text (the perplexity
change, or with ``--criterion kl`` the divergence from the base model's predictions);
``--search cheapest`` takes the n cheapest for the plan of n units. Costs do not add up,
so ``--search forward`` instead grows the plan one unit at a time, each time adding the
unit that makes the whole plan cheapest on the search text (the frontier's
``forward_selection``, here over every unit and not only the frontier's pool of the
cheapest alone: n steps, about n times the singles' cost).
Head maps come from the same attention statistics in both (``--mode``),
so only the unit differs. Each plan is then judged on held-out text of the calibration's
domain and on text of another domain, which the search never reads. Here a borrowed head
may read the kept heads of a partly shared layer (``reference.shared_attention(shared_heads=)``);
``convert --span L.G`` shares the same groups, with maps that read only unshared layers.

``--search-texts news,code`` ranks by the mean relative penalty on the tails of both
texts (as ``analyze --frontier`` does with two ``--calib``), ``--min-layer`` searches only
units of that layer and later, and ``--fit`` then fits each plan's maps with rank-8
corrections on news and code (what ``convert --head-map fit --lora-rank 8`` does with two
``--calib``: 120 steps, 16,384 tokens of each, the sources' Q and K corrected too) and
judges it. Every plan is also judged on Wikipedia articles, which neither the search nor a fit reads; ``--plan``
judges the plans it names instead of searching.
Each judged penalty comes with its 95% interval in brackets (``accuracy.intervals``).
"""

from __future__ import annotations

import argparse
import contextlib
import time

from sa_export.accuracy.adapters import PROJECTIONS, SOURCE_PROJECTIONS, LowRankAdapters
from sa_export.accuracy.calibration import collect_statistics, head_sources_from
from sa_export.accuracy.distill import FIT_STEPS_WITH_CORRECTIONS, fit_maps_and_temperatures, plan_with_fitted_maps
from sa_export.accuracy.frontier import HEAL_LORA_RANK, forward_selection
from sa_export.accuracy.evaluate import base_log_probs, divergence, layer_inputs_of, load_for_reference, perplexity, perplexity_of, token_nlls
from sa_export.accuracy.intervals import penalty_interval
from sa_export.accuracy.texts import CALIB_TOKENS, LORA_CALIB_TOKENS, other_domain_text_path, split_texts, unseen_domain_tokens
from sa_export.core.plan import HeadMap, SharingPlan
from sa_export.core.progress import progress_bar
from sa_export.core.atomic import write_json_atomic

WINDOW = 1024


def unit_plan(units: list[tuple[int, int | None]], stats, mode: str, num_layers: int, group_size: int):
    """The plan and borrowed heads of ``units``: (layer, KV group), or (layer, None) for a whole layer.

    Each borrowed head reads the heads of earlier layers that are not borrowed themselves
    (a partly shared layer still computes its other heads), through the mode's map fitted
    on the statistics; a layer's heads that are not borrowed keep their own attention.
    The plan is built directly: ``SharingPlan.with_head_maps`` knows only whole layers."""
    borrowed: dict[int, set[int]] = {}
    for layer, group in units:
        heads = range(stats.num_heads) if group is None else range(group * group_size, (group + 1) * group_size)
        borrowed.setdefault(layer, set()).update(heads)
    maps = {}
    for layer, heads in borrowed.items():
        pairs = [(l, h) for l in range(layer) for h in range(stats.num_heads) if h not in borrowed.get(l, ())]
        # Heads the layer keeps get a placeholder map: the reference uses their own attention.
        sources, weights = zip(*(
            head_sources_from(stats, (layer, head), pairs, mode) if head in heads else (((layer - 1, head),), (1.0,))
            for head in range(stats.num_heads)
        ))
        width = max(len(s) for s in sources)
        sources = tuple(s + (s[-1],) * (width - len(s)) for s in sources)
        weights = tuple(w + (0.0,) * (width - len(w)) for w in weights)
        maps[layer] = HeadMap(sources, weights)
    plan = SharingPlan(num_layers, {layer: layer - 1 for layer in borrowed}, maps)
    return plan, {layer: tuple(sorted(heads)) for layer, heads in borrowed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", default="mix", choices=("mix", "argmax-any"), help="head-map mode of both searches: maps from any earlier unshared layer")
    parser.add_argument("--units", default="1,2,3,4", help="plan sizes, in whole layers' worth of K cache")
    parser.add_argument("--search-tokens", type=int, default=2048)
    parser.add_argument(
        "--criterion", default="ppl", choices=("ppl", "kl"),
        help="rank units by their perplexity change on the search text, or by the KL divergence from the base model's predictions",
    )
    parser.add_argument("--search", default="cheapest", choices=("cheapest", "forward"),
                        help="take the n cheapest units shared alone, or grow the plan one unit at a time on the whole plan's cost")
    parser.add_argument("--unit", default="both", choices=("layer", "kv-group", "both"), help="which units to search")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--min-layer", type=int, default=1, help="search only units of this layer and later")
    parser.add_argument("--search-texts", default="news", choices=("news", "news,code"), help="rank plans on the tail of news, or by their mean penalty on news and code")
    parser.add_argument("--fit", action="store_true", help="fit each plan's maps with rank-8 corrections on news and code, and judge that too")
    parser.add_argument("--plan", action="append", default=[], help="judge this plan instead of searching: its units, "
                        "space-separated, a whole layer as 25 and a KV group as 26.1 (repeat for several plans)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        named = [_named_plan(text) for text in args.plan]
    except ValueError:
        parser.error(f"--plan takes units such as '25 26.0 26.1', not {args.plan!r}")

    _, config, model, tokenizer = load_for_reference(args.model)
    num_layers = config.num_hidden_layers
    if not 1 <= args.min_layer < num_layers:
        parser.error(f"--min-layer must be 1 to {num_layers - 1}")
    calib_tokens = LORA_CALIB_TOKENS if args.fit else CALIB_TOKENS
    evaluation, calibration = split_texts(tokenizer, None, None, args.eval_tokens, calib_tokens)
    code_file = other_domain_text_path()
    code, code_calibration = split_texts(tokenizer, code_file, code_file, args.eval_tokens, calib_tokens)
    # Wikipedia: a domain that neither the search nor a fit reads.
    texts = {"calib-domain": evaluation.ids, "other-domain": code.ids, "wiki": unseen_domain_tokens(tokenizer, None, args.eval_tokens).ids}
    searches = {"news": calibration.ids[: args.search_tokens]}
    if args.search_texts == "news,code":
        searches["code"] = code_calibration.ids[: args.search_tokens]
    started = time.perf_counter()
    stats = collect_statistics(model, calibration.ids[:CALIB_TOKENS])
    groups = config.num_key_value_heads
    group_size = config.num_attention_heads // groups
    inputs = {name: layer_inputs_of(model, ids, WINDOW) for name, ids in searches.items()}  # each plan runs from its first changed layer
    base_search = {name: perplexity(model, ids, WINDOW, inputs=inputs[name]) for name, ids in searches.items()}
    base_nlls = {name: token_nlls(model, ids, WINDOW) for name, ids in texts.items()}  # per-token losses: the intervals pair them
    base = {name: perplexity_of(nlls) for name, nlls in base_nlls.items()}
    print("base ppl " + ", ".join(f"{name} {value:.2f}" for name, value in base.items())
          + ", search " + ", ".join(f"{name} {value:.2f}" for name, value in base_search.items()))

    teachers = {name: base_log_probs(model, ids, WINDOW) for name, ids in searches.items()} if args.criterion == "kl" else None

    def penalty_on_search(units):
        plan, heads = unit_plan(units, stats, args.mode, num_layers, group_size)
        if teachers is not None:
            costs = [divergence(model, ids, WINDOW, teachers[name], plan, heads, inputs[name]) for name, ids in searches.items()]
        else:
            costs = [perplexity(model, ids, WINDOW, plan, shared_heads=heads, inputs=inputs[name]) / base_search[name] - 1 for name, ids in searches.items()]
        return sum(costs) / len(costs)

    candidates = {
        "layer": [(layer, None) for layer in range(args.min_layer, num_layers)],
        "kv-group": [(layer, group) for layer in range(args.min_layer, num_layers) for group in range(groups)],
    }
    per_layer = {"layer": 1, "kv-group": groups}
    units = [unit for unit in candidates if args.unit in (unit, "both")] if not named else []
    sizes = [int(n) for n in args.units.split(",")]
    ranked: dict[str, list] = {}  # unit kind -> units in the order the search takes them
    cost: dict[str, dict] = {}
    for unit in units:
        pool = candidates[unit]
        if args.search == "forward":
            steps = max(sizes) * per_layer[unit]
            with progress_bar(f"{unit}s added one at a time ({steps} steps), on {len(searches['news'])} calibration tokens of {' and '.join(searches)}", unit=unit) as advance:
                ranked[unit], trail = forward_selection(pool, steps, penalty_on_search, advance)
            cost[unit] = dict(zip(ranked[unit], trail))  # the plan's cost once that unit joined it
            continue
        with progress_bar(f"each {unit} shared alone, on {len(searches['news'])} calibration tokens of {' and '.join(searches)}", unit=unit) as advance:
            cost[unit] = {}
            for number, candidate in enumerate(pool):
                cost[unit][candidate] = penalty_on_search([candidate])
                advance(number + 1, len(pool))
        ranked[unit] = sorted(cost[unit], key=cost[unit].get)
    searched_s = time.perf_counter() - started
    rows = []
    print(f"\n{'KV saved':>8} {'unit':>9} {'maps':>8} " + " ".join(f"{name + ' penalty':>25}" for name in texts) + "  units")
    chosen_plans = named or [(unit, sorted(ranked[unit][: size * per_layer[unit]])) for size in sizes for unit in units]
    for unit, chosen in chosen_plans:
        plan, heads = unit_plan(chosen, stats, args.mode, num_layers, group_size)
        label = " ".join(f"{l}" if g is None else f"{l}.{g}" for l, g in chosen)
        fits = {"maps": (plan, None)}
        if args.fit:
            print(f"  fitting {label}", flush=True)
            fit_started = time.perf_counter()
            fits["fit+lora"] = _fit_with_corrections(model, plan, heads, calibration.ids + code_calibration.ids)
            print(f"  {label}: fit {time.perf_counter() - fit_started:.0f} s", flush=True)
        for name, (fitted, adapters) in fits.items():
            with adapters.active() if adapters is not None else contextlib.nullcontext():
                nlls = {text: token_nlls(model, ids, WINDOW, fitted, shared_heads=heads) for text, ids in texts.items()}
            intervals = {text: penalty_interval(base_nlls[text], nlls[text]) for text in texts}
            ppl = {text: perplexity_of(nlls[text]) for text in texts}
            row = {
                "unit": unit, "maps": name, "kv_fraction_saved": _layers_worth(chosen, groups) / (2 * num_layers), "units": [list(c) for c in chosen],
                "ppl": ppl, "penalty": {text: ppl[text] / base[text] - 1 for text in texts},
                "penalty_interval": {text: interval.to_json() if interval is not None else None for text, interval in intervals.items()},
            }
            rows.append(row)
            cells = " ".join(f"{_penalty_cell(row['penalty'][text], intervals[text]):>25}" for text in texts)
            print(f"{100 * row['kv_fraction_saved']:>7.1f}% {unit:>9} {name:>8} {cells}  {label}", flush=True)
    print(f"\nsearch {searched_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    if args.json:
        write_json_atomic(args.json, {
            "mode": args.mode, "criterion": args.criterion, "search": args.search, "search_texts": args.search_texts, "min_layer": args.min_layer,
            "base": base, "base_search": base_search, "rows": rows,
            # cheapest: each unit's cost alone; forward: the plan's cost once that unit joined it
            "search_cost": {unit: [[list(k), v] for k, v in table.items()] for unit, table in cost.items()},
        })


def _penalty_cell(penalty: float, interval) -> str:
    """'+3.1% [+2.0,+4.2]': the penalty and its 95% interval, in percent."""
    return f"{100 * penalty:+.1f}%" + ("" if interval is None else f" {interval.brackets(',')}")


def _named_plan(text: str) -> tuple[str, list[tuple[int, int | None]]]:
    """'25 26.0 26.1' -> ('kv-group', [(25, None), (26, 0), (26, 1)]): whole layers and KV groups."""
    chosen = sorted((int(layer), int(group) if group else None) for layer, _, group in (unit.partition(".") for unit in text.split()))
    if not chosen:
        raise ValueError(text)
    return ("layer" if all(group is None for _, group in chosen) else "kv-group"), chosen


def _layers_worth(chosen: list[tuple[int, int | None]], groups: int) -> float:
    """The K caches a plan drops, in whole layers' worth."""
    return sum(1.0 if group is None else 1.0 / groups for _, group in chosen)


def _fit_with_corrections(model, plan: SharingPlan, heads: dict[int, tuple[int, ...]], token_ids: list[int]):
    """``plan`` with its maps fitted, and the rank-8 corrections fitted with them (V/O of the
    layers that borrow, Q/K of those they read), as ``convert --head-map fit --lora-rank 8`` fits."""
    started = time.perf_counter()
    adapters = LowRankAdapters(model, sorted(heads), HEAL_LORA_RANK, projections=PROJECTIONS)
    adapters.add_sources(model, plan, SOURCE_PROJECTIONS)
    maps, _ = fit_maps_and_temperatures(model, plan, token_ids, plan.head_maps, FIT_STEPS_WITH_CORRECTIONS, adapters=adapters, shared_heads=heads,
                                        on_validate=lambda step, kl: print(f"    step {step}: held-out KL {kl:.5f} ({time.perf_counter() - started:.0f} s)", flush=True))
    return plan_with_fitted_maps(plan, maps, heads), adapters


if __name__ == "__main__":
    main()

"""The accuracy frontier: for each number of shared layers, the cheapest plan found and
its perplexity penalty, per head-map mode, on held-out text of the calibration's domain
and on text of another domain.

The search is greedy and practical on a CPU. Every layer is first shared alone (with its
previous layer as anchor) and its cost measured on the search texts: the tail of each
calibration text, a plan's cost being its mean relative penalty over them (or, with
``search_cost="worst"``, its worst), so that a layer cheap on one domain and dear on
another is not taken for cheap. The plan of k
shared layers is the plan of k-1 plus the one layer, of the ``pool`` cheapest alone,
that makes the cheapest plan together: layers cheap alone can cost much more in company,
as their spans merge and their anchors move. Plans are groups of spans of consecutive
layers, each with the last unshared layer before it as anchor. Only the chosen plans
are measured on the evaluation texts, which the search never reads.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sa_export.accuracy.calibration import AttentionStatistics, calibrate_head_maps
from sa_export.accuracy.evaluate import layer_inputs_of, perplexity_of, token_nlls
from sa_export.accuracy.intervals import PenaltyInterval, penalty_interval
from sa_export.accuracy.texts import TokenText
from sa_export.core.errors import UsageError
from sa_export.core.architectures import ModelShape
from sa_export.core.plan import KvGroup, SharingPlan, Span, build_plan, consecutive_runs
from sa_export.core.progress import progress_bar, step

WINDOW = 1024
LAYER, KV_GROUP = "layer", "kv-group"  # units of sharing the search adds one at a time
UNITS = (LAYER, KV_GROUP)
# The corrections' rank in the heal command: rank 8 measured best on 26-29 and 23-26 (README, heal).
HEAL_LORA_RANK = 8


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
    mode: str
    shared_layers: tuple[int, ...]
    spans: tuple[str, ...]
    kv_fraction_saved: float
    kv_bytes_saved_per_token: int
    ppl: dict[str, float]  # text name -> SA perplexity
    base_ppl: dict[str, float]
    search_penalty: dict[str, float] = dataclasses.field(default_factory=dict)  # search text name -> relative penalty
    intervals: dict[str, PenaltyInterval | None] = dataclasses.field(default_factory=dict)  # text name -> how sure the penalty is
    unit: str = LAYER  # what the search added one at a time

    @property
    def label(self) -> str:
        return curve_label(self.mode, self.unit)

    def penalty(self, text: str) -> float:
        """Relative perplexity penalty: SA / base - 1."""
        return self.ppl[text] / self.base_ppl[text] - 1

    @property
    def worst_penalty(self) -> float:
        return max(self.penalty(text) for text in self.ppl)

    def command(self, model: str, calibration_args: str = "") -> str:
        """The convert command of this plan; ``calibration_args`` (--calib ...) follow calibrated maps."""
        head_map = f" --head-map {self.mode}{calibration_args}" if self.mode != "identity" else ""
        return self._convert(model) + head_map

    def heal_command(self, model: str, calibration_files: str = "") -> str:
        """The convert command that fits this plan's maps with low-rank corrections
        (``--head-map fit --lora-rank``, on ``calibration_files``: --calib ...). The search
        does not measure it: a fit takes minutes where a point takes seconds."""
        return f"{self._convert(model)} --head-map fit --lora-rank {HEAL_LORA_RANK}{calibration_files}"

    def _convert(self, model: str) -> str:
        """``sa-export convert MODEL`` with this plan's spans."""
        return f"sa-export convert {model} " + " ".join(f"--span {span}" for span in self.spans)

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "unit": self.unit, "shared_layers": list(self.shared_layers), "spans": list(self.spans),
            "kv_fraction_saved": self.kv_fraction_saved, "kv_bytes_saved_per_token": self.kv_bytes_saved_per_token,
            "ppl": self.ppl, "base_ppl": self.base_ppl, "penalty": {text: self.penalty(text) for text in self.ppl},
            "search_penalty": self.search_penalty,
            "penalty_interval": {text: interval.to_json() if interval else None for text, interval in self.intervals.items()},
        }


def curve_label(mode: str, unit: str) -> str:
    """The curve a point is on: the head-map mode, and the unit when it is not a layer."""
    return mode if unit == LAYER else f"{mode}, KV groups"


def spans_of(layers: list[int]) -> list[str]:
    """Maximal runs of consecutive layers, as --span arguments."""
    return [f"{run[0]}-{run[-1]}" for run in consecutive_runs(layers)]


def _plan(units: list, num_layers: int, stats: AttentionStatistics, mode: str, kinds, groups: dict[str, int] | None = None) -> SharingPlan:
    """The plan of ``units`` (layers, or KV groups with ``groups``: the model's head counts), with the mode's maps.
    Each layer is a span of its own: consecutive ones take the same anchor as their run would."""
    units = [unit if isinstance(unit, KvGroup) else Span(unit, unit) for unit in units]
    plan = build_plan(units, num_layers, (), kinds, **(groups or {}))
    return plan.with_head_maps(calibrate_head_maps(stats, plan, mode, kinds))


def plan_spans(plan: SharingPlan) -> list[str]:
    """The --span arguments that build ``plan``: its whole layers in maximal runs, then the
    groups of its partly shared layers (a layer whose every group is shared reads as whole)."""
    return spans_of(list(plan.whole_layers)) + [f"{layer}.{g}" for layer, groups in sorted(plan.shared_groups.items()) for g in groups]


def _layers_of(units) -> tuple[int, ...]:
    return tuple(sorted({u.layer if isinstance(u, KvGroup) else u for u in units}))


def _unit_key(units) -> tuple:
    """A plan's units, sorted, as frontier.json names them (layers as numbers, groups as L.G)."""
    return tuple(str(u) if isinstance(u, KvGroup) else u for u in sorted(units))


# How a plan's penalties on the search texts make its cost. The mean is the default: on
# SmolLM2 (identity maps, news and code) the worst text passed over 25 and 27-29, the plan
# that costs least on held-out news and on Wikipedia, for one dearer on both (README).
SEARCH_COSTS = {
    "mean": lambda penalties: sum(penalties.values()) / len(penalties),
    "worst": lambda penalties: max(penalties.values()),
}
DEFAULT_SEARCH_COST = "mean"

# Single layers each greedy step tries, the cheapest alone: a step costs as many plans as
# the pool, not as the model's layers (12 of SmolLM2's 29).
DEFAULT_POOL = 12


class _Measure:
    """Perplexities of plans on some texts, each run from the plan's first layer on the
    base model's inputs to it (``layer_inputs``): the layers below run once per text."""

    def __init__(self, hf_model, texts: dict[str, TokenText]):
        self.hf_model, self.texts = hf_model, texts
        self.inputs = {name: layer_inputs_of(hf_model, text.ids, WINDOW) for name, text in texts.items()}
        self.base_nlls = self.nlls(None)
        self.base = {name: perplexity_of(nlls) for name, nlls in self.base_nlls.items()}

    def nlls(self, plan: SharingPlan | None) -> dict[str, torch.Tensor]:
        """Per-token losses of ``plan`` on each text."""
        return {name: token_nlls(self.hf_model, text.ids, WINDOW, plan, inputs=self.inputs[name]) for name, text in self.texts.items()}

    def perplexities(self, plan: SharingPlan | None) -> dict[str, float]:
        return {name: perplexity_of(nlls) for name, nlls in self.nlls(plan).items()}

    def intervals(self, nlls: dict[str, torch.Tensor]) -> dict[str, PenaltyInterval | None]:
        """How sure the penalty of the plan that lost ``nlls`` is on each text."""
        return {name: penalty_interval(self.base_nlls[name], losses) for name, losses in nlls.items()}

    def cost(self, plan: SharingPlan) -> dict[str, float]:
        """Relative penalty of ``plan`` on each text."""
        return {name: ppl / self.base[name] - 1 for name, ppl in self.perplexities(plan).items()}


def forward_selection(pool: list, size: int, plan_cost, progress=None) -> tuple[list, list[float]]:
    """The plan of ``size`` units grown one at a time: each step adds the unit of ``pool``
    whose addition makes ``plan_cost(units)`` least. Returns the units in the order taken
    and the cost of the plan after each step; the plan of n units is the first n."""
    chosen: list = []
    trail: list[float] = []
    for taken in range(size):
        scores = {}
        for candidate in pool:
            if candidate not in chosen:
                scores[candidate] = plan_cost([*chosen, candidate])
                if progress is not None:
                    progress(len(scores), len(pool) - taken)
        best = min(scores, key=scores.get)
        chosen.append(best)
        trail.append(scores[best])
    return chosen, trail


def search_frontier(
    hf_model, config, stats: AttentionStatistics, search: dict[str, TokenText], texts: dict[str, TokenText], modes: list[str],
    max_shared: int, pool: int = DEFAULT_POOL, search_cost: str = DEFAULT_SEARCH_COST, units: tuple[str, ...] = (LAYER,),
) -> tuple[list[FrontierPoint], dict]:
    """Frontier points for k = 1..max_shared shared layers in each mode (and unit), and a
    report of the search: how long it took, on which texts, and every plan it measured.

    ``search``: the texts plans are chosen on (``search_cost`` of the relative penalties on them);
    ``texts``: the texts the chosen plans are reported on; ``units``: layers, KV groups or both
    (each a search of its own).
    """
    num_layers = config.num_hidden_layers
    if not 1 <= max_shared < num_layers // 2 + 1:
        raise UsageError(f"--max-shared {max_shared} is out of range: share 1-{num_layers // 2} of {num_layers} layers")
    if pool < 1:
        raise UsageError(f"--search-pool {pool}: give at least 1")
    if search_cost not in SEARCH_COSTS:
        raise UsageError(f"--search-cost {search_cost}: choose {' or '.join(SEARCH_COSTS)}")
    if not units or not set(units) <= set(UNITS):
        raise UsageError(f"--frontier-unit {','.join(units)}: choose {' or '.join(UNITS)}, or both")
    aggregate = SEARCH_COSTS[search_cost]
    kinds = getattr(config, "layer_types", None)
    shape = ModelShape.from_config(config)
    itemsize = torch.finfo(next(hf_model.parameters()).dtype).bits // 8
    kv_bytes_per_token = 2 * num_layers * shape.num_kv_heads * shape.head_dim * itemsize
    started = time.perf_counter()
    with step(f"base model's layer inputs on {', '.join(search)} and {', '.join(texts)}"):
        searcher, judge = _Measure(hf_model, search), _Measure(hf_model, texts)
    base = judge.base
    # Every layer that can be shared alone: its previous layer is of its kind.
    singles = [layer for layer in range(1, num_layers) if kinds is None or kinds[layer] == kinds[layer - 1]]
    points: list[FrontierPoint] = []
    searched: dict[str, list[dict]] = {}
    for mode in modes:
        for unit in units:
            grouped = unit == KV_GROUP
            label = curve_label(mode, unit)
            pieces = [KvGroup(layer, g) for layer in singles for g in range(shape.num_kv_heads)] if grouped else singles
            groups = shape.head_groups if grouped else None
            cost: dict[tuple, dict[str, float]] = {}

            # Spans merged from single layers keep a valid anchor: a single's previous layer is of its kind.
            def plan_cost(chosen: list) -> float:
                key = tuple(sorted(chosen))
                if key not in cost:
                    cost[key] = searcher.cost(_plan(list(key), num_layers, stats, mode, kinds, groups))
                return aggregate(cost[key])

            with progress_bar(f"frontier ({label}): each {unit} shared alone, on {', '.join(search)}", unit=unit) as advance:
                for number, piece in enumerate(pieces):
                    plan_cost([piece])
                    advance(number + 1, len(pieces))
            candidates = sorted(pieces, key=lambda piece: aggregate(cost[(piece,)]))[:pool]
            # As many KV groups as max_shared layers hold: the same savings, in finer steps.
            steps = min(max_shared * (shape.num_kv_heads if grouped else 1), len(candidates))
            with progress_bar(f"frontier ({label}): plans of 1-{steps} {unit}s, each the best of {len(candidates)} additions", unit="plan") as advance:
                order, _ = forward_selection(candidates, steps, plan_cost, advance)
            with progress_bar(f"frontier ({label}): the chosen plans on {', '.join(texts)}", unit="plan") as advance:
                for k in range(1, steps + 1):
                    chosen = sorted(order[:k])
                    plan = _plan(chosen, num_layers, stats, mode, kinds, groups)
                    nlls = judge.nlls(plan)
                    ppl = {name: perplexity_of(losses) for name, losses in nlls.items()}
                    points.append(FrontierPoint(
                        mode, _layers_of(chosen), tuple(plan_spans(plan)), plan.kv_fraction_saved,
                        round(plan.kv_fraction_saved * kv_bytes_per_token), ppl, base,
                        search_penalty=cost[tuple(chosen)], intervals=judge.intervals(nlls), unit=unit,
                    ))
                    advance(k, steps)
            # Every plan measured, cheapest first: what the search weighed the chosen plans against.
            searched[label] = [{"shared_layers" if not grouped else "shared_groups": list(_unit_key(key)), "search_penalty": penalty}
                               for key, penalty in sorted(cost.items(), key=lambda item: (len(item[0]), aggregate(item[1])))]
    report = {
        "seconds": round(time.perf_counter() - started, 1), "device": str(next(hf_model.parameters()).device),
        "texts": {name: text.to_json() for name, text in search.items()}, "cost": search_cost, "pool": pool, "units": list(units),
        "judged_texts": {name: text.to_json() for name, text in texts.items()},
        "plans_searched": sum(len(plans) for plans in searched.values()), "plans": searched,
    }
    return points, report


def recommend(points: list[FrontierPoint], kv_saving: float | None, max_penalty: float | None) -> FrontierPoint | None:
    """The point a user asks for: the least worst-text penalty saving at least ``kv_saving``,
    or the largest saving whose penalty is at most ``max_penalty`` on every text."""
    if kv_saving is not None:
        # A saving asked as 0.067 means 6.7%, which 4 of 60 caches (6.67%) give: compare at 0.1%.
        enough = [p for p in points if round(p.kv_fraction_saved, 3) >= kv_saving]
        if not enough:
            return None
        least = min(p.kv_fraction_saved for p in enough)
        return min((p for p in enough if p.kv_fraction_saved == least), key=lambda p: p.worst_penalty)
    if max_penalty is not None:
        within = [p for p in points if p.worst_penalty <= max_penalty]
        return max(within, key=lambda p: (p.kv_fraction_saved, -p.worst_penalty)) if within else None
    return None


def save_plot(points: list[FrontierPoint], texts: list[str], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for axis, text in zip(axes[0], texts):
        for label in dict.fromkeys(p.label for p in points):
            mine = sorted((p for p in points if p.label == label), key=lambda p: p.kv_fraction_saved)
            # max(0, ...): the interval's centre and the penalty are one number computed two ways, and may differ in the last bit
            errors = [[max(0.0, 100 * (p.penalty(text) - _ends(p, text)[0])) for p in mine], [max(0.0, 100 * (_ends(p, text)[1] - p.penalty(text))) for p in mine]]
            axis.errorbar([100 * p.kv_fraction_saved for p in mine], [100 * p.penalty(text) for p in mine], yerr=errors, marker="o", capsize=3, label=label)
        axis.set_xlabel("KV cache saved (%)")
        axis.set_ylabel("perplexity penalty (%), 95% interval")
        axis.set_title(text)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ends(point: FrontierPoint, text: str) -> tuple[float, float]:
    """The ends of a point's 95% interval on ``text`` (the penalty itself where it has none)."""
    interval = point.intervals.get(text)
    return (interval.low, interval.high) if interval else (point.penalty(text), point.penalty(text))

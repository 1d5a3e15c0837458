"""The sharing plan: which layers reuse which anchor's attention probabilities.

Span semantics follow the paper's reference code: ``--span 23-26`` shares layers
23, 24, 25 and 26, and their anchor is 22, the last unshared layer before the span.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from sa_export.core.errors import PlanError

_SPAN_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int  # inclusive

    @classmethod
    def parse(cls, text: str) -> Span:
        match = _SPAN_RE.match(text)
        if not match:
            raise PlanError(f"span {text!r} is not of the form A-B (for example --span 23-26)")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise PlanError(f"span {text!r} ends before it starts; write it as {end}-{start}")
        return cls(start, end)

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


@dataclasses.dataclass(frozen=True)
class HeadMap:
    """Where each query head of a shared layer takes its probabilities from.

    ``sources[h]`` lists (layer, head) pairs and ``weights[h]`` their convex weights:
    head h reads ``sum_k weights[h][k] * P[sources[h][k]]``. One source per head is a
    plain head permutation of the anchor (a single Gather in the graph).
    """

    sources: tuple[tuple[tuple[int, int], ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @classmethod
    def from_anchor_heads(cls, anchor: int, heads: Sequence[int]) -> HeadMap:
        return cls(tuple(((anchor, int(h)),) for h in heads), tuple((1.0,) for _ in heads))

    @property
    def num_heads(self) -> int:
        return len(self.sources)

    @property
    def width(self) -> int:
        """Sources per head (the same for every head)."""
        return len(self.sources[0])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for head in self.sources for layer, _ in head}))

    def is_identity_of(self, anchor: int) -> bool:
        return self.width == 1 and all(src == ((anchor, h),) for h, src in enumerate(self.sources))

    def to_json(self) -> dict:
        return {"sources": [[list(pair) for pair in head] for head in self.sources], "weights": [list(w) for w in self.weights]}

    @classmethod
    def from_json(cls, data: Mapping) -> HeadMap:
        sources = tuple(tuple((int(l), int(h)) for l, h in head) for head in data["sources"])
        weights = tuple(tuple(float(w) for w in head) for head in data["weights"])
        if len({len(head) for head in sources}) != 1 or [len(w) for w in weights] != [len(s) for s in sources]:
            raise PlanError("head map: every head needs the same number of sources, each with a weight")
        return cls(sources, weights)


@dataclasses.dataclass(frozen=True)
class SharingPlan:
    """Anchor of every shared layer, and the optional per-head map into the anchor."""

    num_layers: int
    anchors: Mapping[int, int]  # shared layer -> anchor layer
    head_maps: Mapping[int, HeadMap] = dataclasses.field(default_factory=dict)

    @property
    def shared_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.anchors))

    @property
    def anchor_layers(self) -> tuple[int, ...]:
        """Every layer whose probabilities some shared layer reads."""
        layers = set(self.anchors.values())
        for head_map in self.head_maps.values():
            layers.update(head_map.layers)
        return tuple(sorted(layers))

    @property
    def kv_fraction_saved(self) -> float:
        """Share of the KV cache that sharing removes: one K cache of every shared layer (all layers alike)."""
        return kv_fraction_saved(len(self.anchors), self.num_layers)

    def is_shared(self, layer: int) -> bool:
        return layer in self.anchors

    def head_map(self, layer: int) -> HeadMap | None:
        """Where each query head reads from, or None for the identity map on the anchor."""
        head_map = self.head_maps.get(layer)
        if head_map is None or head_map.is_identity_of(self.anchors[layer]):
            return None
        return head_map

    def sources_of(self, layer: int) -> tuple[int, ...]:
        """The layers whose probabilities shared ``layer`` reads: its head map's sources, or its anchor."""
        head_map = self.head_map(layer)
        return head_map.layers if head_map else (self.anchors[layer],)

    def with_head_maps(self, head_maps: Mapping[int, HeadMap]) -> SharingPlan:
        for layer, head_map in head_maps.items():
            bad = [l for l in head_map.layers if l >= layer or l in self.anchors]
            if bad:
                raise PlanError(f"head map of layer {layer} reads layer {bad[0]}, which is not an earlier unshared layer")
        return dataclasses.replace(self, head_maps=dict(head_maps))

    @property
    def head_map_mode(self) -> str:
        maps = [self.head_map(layer) for layer in self.anchors]
        if not any(maps):
            return "identity"
        return "calibrated"

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "shared": {str(k): v for k, v in sorted(self.anchors.items())},
            "head_maps": {str(k): v.to_json() for k, v in sorted(self.head_maps.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> SharingPlan:
        return cls(
            num_layers=int(data["num_layers"]),
            anchors={int(k): int(v) for k, v in data["shared"].items()},
            head_maps={int(k): HeadMap.from_json(v) for k, v in data.get("head_maps", {}).items()},
        )

    def describe(self) -> str:
        groups: dict[int, list[int]] = {}
        for layer, anchor in sorted(self.anchors.items()):
            groups.setdefault(anchor, []).append(layer)
        parts = [f"layers {_compact(ls)} <- anchor {a}" for a, ls in sorted(groups.items())]
        mapped = [self.head_map(layer) for layer in self.anchors]
        mapped = [m for m in mapped if m is not None]
        if mapped:
            width = max(m.width for m in mapped)
            parts.append(f"head maps on {len(mapped)} layers ({width} source head{'s' if width > 1 else ''} each)")
        return "; ".join(parts)


def kv_fraction_saved(shared_layers: int, num_layers: int) -> float:
    return shared_layers / (2 * num_layers)


def mixture_matrix(head_maps: Sequence[HeadMap], sources: Sequence[int], heads: int, dtype) -> np.ndarray:
    """The [maps * heads, sources * heads] matrix that applies convex head mixtures on the head axis:
    row ``m * heads + h`` holds head h of map m's weights over the stacked sources' heads."""
    matrix = np.zeros((len(head_maps) * heads, len(sources) * heads), dtype=dtype)
    for row, head_map in enumerate(head_maps):
        for head, (pairs, weights) in enumerate(zip(head_map.sources, head_map.weights)):
            for (source, source_head), weight in zip(pairs, weights):
                matrix[row * heads + head, list(sources).index(source) * heads + source_head] += weight
    return matrix


def consecutive_runs(layers: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive layers, in order: [3, 4, 7, 8, 9] -> [[3, 4], [7, 8, 9]]."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][-1] == layer - 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _compact(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def build_plan(
    spans: Sequence[str | Span],
    num_layers: int,
    anchors: Sequence[int] = (),
    layer_kinds: Sequence[str] | None = None,
    force: bool = False,
) -> SharingPlan:
    """Validate spans and anchors against a model with ``num_layers`` layers.

    ``anchors`` is empty (each span takes the last unshared layer before it), one
    anchor for every span, or one anchor per span in order. ``layer_kinds`` names the
    attention kind of each layer (for example "full_attention" / "sliding_attention");
    a shared layer whose kind differs from its anchor's is refused unless ``force``.
    """
    parsed = [s if isinstance(s, Span) else Span.parse(s) for s in spans]
    if not parsed:
        raise PlanError("no --span given; name the layers to share, for example --span 23-26")
    last = num_layers - 1
    for span in parsed:
        if span.end > last:
            raise PlanError(
                f"span {span} is out of range: the model has {num_layers} layers (0-{last})"
            )
        if span.start == 0:
            raise PlanError(
                f"span {span} starts at layer 0, which has no earlier layer to be its anchor; start at 1 or later"
            )
    ordered = sorted(parsed, key=lambda s: s.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start <= before.end:
            raise PlanError(f"spans {before} and {after} overlap; give each layer to one span only")

    if len(anchors) not in (0, 1, len(parsed)):
        raise PlanError(
            f"{len(anchors)} --anchor values for {len(parsed)} spans; give one for all spans or one per span"
        )
    shared = {layer for span in parsed for layer in span.layers}
    plan: dict[int, int] = {}
    for index, span in enumerate(parsed):
        if anchors:
            anchor = anchors[0] if len(anchors) == 1 else anchors[index]
            if anchor >= span.start:
                where = "inside" if anchor <= span.end else "after"
                raise PlanError(
                    f"anchor {anchor} is {where} span {span}; an anchor must be an earlier unshared layer (< {span.start})"
                )
            if anchor < 0:
                raise PlanError(f"anchor {anchor} is negative; layers are numbered 0-{last}")
            if anchor in shared:
                raise PlanError(f"anchor {anchor} is itself shared; pick an unshared layer before span {span}")
        else:
            anchor = span.start - 1
            while anchor in shared:
                anchor -= 1
            if anchor < 0:
                raise PlanError(f"span {span} has no unshared layer before it to be its anchor")
        for layer in span.layers:
            plan[layer] = anchor

    if layer_kinds is not None and not force:
        for layer, anchor in sorted(plan.items()):
            if layer_kinds[layer] != layer_kinds[anchor]:
                raise PlanError(
                    f"layer {layer} ({layer_kinds[layer]}) cannot share with anchor {anchor} "
                    f"({layer_kinds[anchor]}): their attention differs in kind; choose another span or pass --force"
                )
    return SharingPlan(num_layers=num_layers, anchors=plan)

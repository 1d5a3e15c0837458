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
_GROUP_RE = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int  # inclusive

    @classmethod
    def parse(cls, text: str) -> Span:
        match = _SPAN_RE.match(text)
        if not match:
            raise PlanError(f"span {text!r} is not of the form A-B (for example --span 23-26) or L.G (KV group G of layer L)")
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


@dataclasses.dataclass(frozen=True, order=True)
class KvGroup:
    """One KV group of one layer (``--span 26.1``): the query heads that read one KV head.
    Its K cache can go when every one of those heads borrows its probabilities."""

    layer: int
    group: int

    @classmethod
    def parse(cls, text: str) -> KvGroup | None:
        """The group ``text`` names (L.G), or None when it is not of that form."""
        match = _GROUP_RE.match(text)
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    def __str__(self) -> str:
        return f"{self.layer}.{self.group}"


def parse_span(text: str) -> Span | KvGroup:
    """A span A-B (or A) of whole layers, or one KV group L.G."""
    return KvGroup.parse(text) or Span.parse(text)


def kv_groups_in(spans: Sequence[str]) -> list[KvGroup]:
    """The KV groups among --span arguments (each argument checked, so a malformed one fails
    before anything loads): what decides, before a model is read, which graph a plan needs."""
    return [item for item in map(parse_span, spans) if isinstance(item, KvGroup)]


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
    """Anchor of every shared layer, and the optional per-head map into the anchor.

    A layer in ``shared_groups`` is shared in part: only the query heads of those KV groups
    borrow, the others keep their own attention, and its K cache keeps the other groups'
    heads. ``kv_heads`` and ``heads_per_group`` (the model's) are set when any layer is."""

    num_layers: int
    anchors: Mapping[int, int]  # shared layer -> anchor layer
    head_maps: Mapping[int, HeadMap] = dataclasses.field(default_factory=dict)
    shared_groups: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    kv_heads: int = 0
    heads_per_group: int = 0

    @property
    def shared_layers(self) -> tuple[int, ...]:
        """Every layer that borrows probabilities, in whole or in part."""
        return tuple(sorted(self.anchors))

    @property
    def whole_layers(self) -> tuple[int, ...]:
        """The shared layers that lose their whole K cache."""
        return tuple(layer for layer in self.shared_layers if layer not in self.shared_groups)

    def is_partly_shared(self, layer: int) -> bool:
        return layer in self.shared_groups

    def borrowed_heads(self, layer: int) -> tuple[int, ...] | None:
        """The query heads of a partly shared layer that borrow; None for a whole layer."""
        groups = self.shared_groups.get(layer)
        if groups is None:
            return None
        return tuple(g * self.heads_per_group + h for g in groups for h in range(self.heads_per_group))

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The query heads of a partly shared layer that keep their own attention."""
        borrowed = set(self.borrowed_heads(layer) or ())
        return tuple(h for h in range(self.kv_heads * self.heads_per_group) if h not in borrowed)

    def kept_groups(self, layer: int) -> tuple[int, ...]:
        """The KV groups whose K cache a partly shared layer keeps."""
        shared = set(self.shared_groups.get(layer, ()))
        return tuple(g for g in range(self.kv_heads) if g not in shared)

    @property
    def shared_heads(self) -> dict[int, tuple[int, ...]]:
        """Borrowed heads of every partly shared layer (the reference's ``shared_heads``)."""
        return {layer: self.borrowed_heads(layer) for layer in sorted(self.shared_groups)}

    @property
    def anchor_layers(self) -> tuple[int, ...]:
        """Every layer whose probabilities some shared layer reads."""
        layers = set(self.anchors.values())
        for head_map in self.head_maps.values():
            layers.update(head_map.layers)
        return tuple(sorted(layers))

    @property
    def kv_fraction_saved(self) -> float:
        """Share of the KV cache that sharing removes: one K cache of every shared layer (all layers
        alike), and of a partly shared layer the share of its K cache its shared groups hold."""
        partial = sum(len(groups) / self.kv_heads for groups in self.shared_groups.values())
        return kv_fraction_saved(len(self.whole_layers) + partial, self.num_layers)

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
        """The plan with these maps. A map reads earlier layers that compute their own
        attention: unshared layers, and the heads a partly shared layer keeps (not those it borrows)."""
        for layer, head_map in head_maps.items():
            bad = [l for l in head_map.layers if l >= layer or l in self.whole_layers]
            if bad:
                raise PlanError(f"head map of layer {layer} reads layer {bad[0]}, which is not an earlier layer that computes its attention")
            borrowed = [(l, h) for pairs in head_map.sources for l, h in pairs if h in (self.borrowed_heads(l) or ())]
            if borrowed:
                l, h = borrowed[0]
                raise PlanError(f"head map of layer {layer} reads head {h} of layer {l}, which borrows it (--span {l}.{h // self.heads_per_group})")
        return dataclasses.replace(self, head_maps=dict(head_maps))

    @property
    def reads_kept_heads(self) -> bool:
        """Whether a head map reads the heads a partly shared layer keeps."""
        return any(self.is_partly_shared(source) for layer in self.anchors for source in self.sources_of(layer))

    @property
    def head_map_mode(self) -> str:
        maps = [self.head_map(layer) for layer in self.anchors]
        if not any(maps):
            return "identity"
        return "calibrated"

    def to_json(self) -> dict:
        data = {
            "num_layers": self.num_layers,
            "shared": {str(k): v for k, v in sorted(self.anchors.items())},
            "head_maps": {str(k): v.to_json() for k, v in sorted(self.head_maps.items())},
        }
        if self.shared_groups:  # written only when used, so whole-layer plans read as before
            data["shared_groups"] = {str(k): list(v) for k, v in sorted(self.shared_groups.items())}
            data["kv_heads"], data["heads_per_group"] = self.kv_heads, self.heads_per_group
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> SharingPlan:
        return cls(
            num_layers=int(data["num_layers"]),
            anchors={int(k): int(v) for k, v in data["shared"].items()},
            head_maps={int(k): HeadMap.from_json(v) for k, v in data.get("head_maps", {}).items()},
            shared_groups={int(k): tuple(int(g) for g in v) for k, v in data.get("shared_groups", {}).items()},
            kv_heads=int(data.get("kv_heads", 0)),
            heads_per_group=int(data.get("heads_per_group", 0)),
        )

    def describe(self) -> str:
        groups: dict[int, list[int]] = {}
        for layer, anchor in sorted(self.anchors.items()):
            groups.setdefault(anchor, []).append(layer)
        parts = [f"layers {', '.join(self._describe_layers(ls))} <- anchor {a}" for a, ls in sorted(groups.items())]
        mapped = [self.head_map(layer) for layer in self.anchors]
        mapped = [m for m in mapped if m is not None]
        if mapped:
            width = max(m.width for m in mapped)
            parts.append(f"head maps on {len(mapped)} layers ({width} source head{'s' if width > 1 else ''} each)")
        return "; ".join(parts)

    def _describe_layers(self, layers: Sequence[int]) -> list[str]:
        """``23-26``; with partly shared layers, runs of whole ones and each partial one's
        groups: ``25, 26.0+1, 28``."""
        if not any(self.is_partly_shared(layer) for layer in layers):
            return [_compact(layers)]
        whole = [layer for layer in layers if not self.is_partly_shared(layer)]
        named = {run[0]: _compact(run) for run in consecutive_runs(whole)}
        named.update({layer: f"{layer}." + "+".join(map(str, self.shared_groups[layer])) for layer in layers if self.is_partly_shared(layer)})
        return [named[first] for first in sorted(named)]


def kv_fraction_saved(shared_layers: float, num_layers: int) -> float:
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
    spans: Sequence[str | Span | KvGroup],
    num_layers: int,
    anchors: Sequence[int] = (),
    layer_kinds: Sequence[str] | None = None,
    force: bool = False,
    kv_heads: int = 0,
    num_heads: int = 0,
) -> SharingPlan:
    """Validate spans and anchors against a model with ``num_layers`` layers.

    ``anchors`` is empty (each span takes the last unshared layer before it), one
    anchor for every span, or one anchor per span in order. ``layer_kinds`` names the
    attention kind of each layer (for example "full_attention" / "sliding_attention");
    a shared layer whose kind differs from its anchor's is refused unless ``force``.
    A span may also name one KV group (``26.1``: ``kv_heads`` and ``num_heads`` say how
    the model's heads fall into groups); the groups of one layer together count as one
    span of that layer, and a layer all of whose groups are named is shared whole.
    """
    items = [s if isinstance(s, (Span, KvGroup)) else parse_span(s) for s in spans]
    groups = _groups_by_layer([i for i in items if isinstance(i, KvGroup)], num_layers, kv_heads, num_heads)
    if groups and len(anchors) > 1:
        raise PlanError("with KV groups (L.G), give --anchor once for all spans or not at all")
    spans = [i for i in items if isinstance(i, Span)] + [Span(layer, layer) for layer in groups]
    partial = {layer: g for layer, g in groups.items() if len(g) < kv_heads}
    plan = _build_whole_plan(spans, num_layers, anchors, layer_kinds, force)
    if not partial:
        return plan
    return dataclasses.replace(plan, shared_groups=partial, kv_heads=kv_heads, heads_per_group=num_heads // kv_heads)


def _groups_by_layer(groups: Sequence[KvGroup], num_layers: int, kv_heads: int, num_heads: int) -> dict[int, tuple[int, ...]]:
    """The KV groups named for each layer, checked against the model."""
    if groups and (kv_heads <= 0 or num_heads <= 0 or num_heads % kv_heads):
        raise PlanError(f"--span {groups[0]} names a KV group, but this model's KV heads are not known here; share whole layers")
    by_layer: dict[int, set[int]] = {}
    for item in groups:
        if item.group >= kv_heads:
            raise PlanError(f"--span {item}: layer {item.layer} has {kv_heads} KV groups (0-{kv_heads - 1})")
        if item.layer >= num_layers:
            raise PlanError(f"--span {item} is out of range: the model has {num_layers} layers (0-{num_layers - 1})")
        if item.group in by_layer.get(item.layer, ()):
            raise PlanError(f"--span {item} is given twice")
        by_layer.setdefault(item.layer, set()).add(item.group)
    return {layer: tuple(sorted(g)) for layer, g in sorted(by_layer.items())}


def _build_whole_plan(
    spans: Sequence[Span], num_layers: int, anchors: Sequence[int], layer_kinds: Sequence[str] | None, force: bool
) -> SharingPlan:
    parsed = list(spans)
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

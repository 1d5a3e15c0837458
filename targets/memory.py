"""Does the model fit the target's memory, and what is the longest context that does?

total = weights + KV cache (batch x context x bytes per token) + activations + workspace.
The activation estimate is the prefill profile's peak: attention scores and
probabilities of one layer ([batch, heads, P, P] in fp32, as the fp32 Softmax keeps
them), the logits ([batch, P, vocab]) and a few hidden-state buffers. Weights and KV
bytes are exact; the activation figure is an upper-bound estimate.

What SA adds: an anchor's probabilities ([batch, heads, P, P] in the graph's precision)
stay alive from the anchor until the last layer that reads them, while the layers in
between compute their own scores. The SA model's activations count the largest number
of such tensors alive at once (`live_probability_tensors`), at the prefill profile's P
(the longest prompt chunk a runtime feeds: the profile bounds it).
"""

from __future__ import annotations

import dataclasses

from sa_export.core.cache_names import precision_itemsize
from sa_export.core.manifest import Manifest
from sa_export.core.plan import SharingPlan
from targets.profiles import TargetProfile

GIB = 1 << 30
_HIDDEN_BUFFERS = 8


@dataclasses.dataclass(frozen=True)
class MemoryFit:
    target: str
    usable_bytes: int
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    batch: int
    context: int
    kv_per_token_base: int
    kv_per_token_sa: int
    max_positions: int | None = None  # the model's own limit, whatever the memory
    sa_probability_bytes: int = 0  # anchors' prefill probabilities held for shared layers

    def total(self, sa: bool, context: int | None = None) -> int:
        """Bytes of the SA model (``sa``) or of the baseline at ``context`` tokens (default: the planned context)."""
        context = self.context if context is None else context
        kv_per_token = self.kv_per_token_sa if sa else self.kv_per_token_base
        extra = self.sa_probability_bytes if sa else 0
        return self.weight_bytes + self.activation_bytes + extra + self.workspace_bytes + self.batch * context * kv_per_token

    @property
    def fits_sa(self) -> bool:
        return self.total(sa=True) <= self.usable_bytes

    @property
    def fits_base(self) -> bool:
        return self.total(sa=False) <= self.usable_bytes

    def max_context(self, sa: bool) -> int:
        free = self.usable_bytes - self.total(sa, 0)
        return max(0, free // (self.batch * (self.kv_per_token_sa if sa else self.kv_per_token_base)))

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "usable_bytes": self.usable_bytes,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "workspace_bytes": self.workspace_bytes,
            "sa_probability_bytes": self.sa_probability_bytes,
            "batch": self.batch,
            "context": self.context,
            "total_bytes_base": self.total(sa=False),
            "total_bytes_sa": self.total(sa=True),
            "fits_base": self.fits_base,
            "fits_sa": self.fits_sa,
            "max_context_base": self.max_context(sa=False),
            "max_context_sa": self.max_context(sa=True),
            "max_positions": self.max_positions,
        }

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        return [
            f"memory on {self.target}: {gib(self.usable_bytes)} usable; weights {gib(self.weight_bytes)}, "
            f"activations ~{gib(self.activation_bytes)} (+{gib(self.sa_probability_bytes)} anchor probabilities held for SA), "
            f"workspace {gib(self.workspace_bytes)}",
            f"at batch {self.batch} x {self.context} tokens: baseline {gib(self.total(sa=False))} "
            f"({'fits' if self.fits_base else 'does not fit'}), SA {gib(self.total(sa=True))} "
            f"({'fits' if self.fits_sa else 'does not fit'})",
            f"largest context that fits at batch {self.batch}: baseline {self.max_context(sa=False):,} tokens, "
            f"SA {self.max_context(sa=True):,} tokens"
            + (f" (the model itself stops at {self.max_positions:,} positions)" if self.max_positions else ""),
        ]


def live_probability_tensors(plan: SharingPlan) -> int:
    """The most anchor probability tensors alive at once: each lives from its layer to its last reader."""
    last_reader: dict[int, int] = {}
    for layer in plan.anchors:
        for source in plan.sources_of(layer):
            last_reader[source] = max(last_reader.get(source, layer), layer)
    return max((sum(1 for s, end in last_reader.items() if s <= layer < end) for layer in range(plan.num_layers)), default=0)


def memory_fit(manifest: Manifest, weight_bytes: int, target: TargetProfile, batch: int, context: int) -> MemoryFit:
    model = manifest.model
    itemsize = precision_itemsize(manifest.precision)
    prefill = target.max_prefill
    activations = batch * (
        2 * model.num_heads * prefill * prefill * 4
        + prefill * model.vocab_size * itemsize
        + _HIDDEN_BUFFERS * prefill * model.hidden_size * 4
    )
    savings = manifest.cache.savings
    return MemoryFit(
        target=target.name,
        usable_bytes=int(target.usable_gib * GIB),
        weight_bytes=weight_bytes,
        activation_bytes=activations,
        workspace_bytes=target.workspace_mib << 20,
        batch=batch,
        context=context,
        kv_per_token_base=savings.bytes_per_token_base,
        kv_per_token_sa=savings.bytes_per_token_sa,
        max_positions=model.max_position_embeddings,
        sa_probability_bytes=batch * live_probability_tensors(manifest.plan) * model.num_heads * prefill * prefill * itemsize,
    )

"""Head maps fitted on what the model outputs, not only on how alike the maps look.

``fit`` starts from the ``mix-few`` maps and keeps their source layers (so the graph, and
its cost at decode, is the same), but lets every head of a shared layer read every head
of those layers, with a gain: head h reads ``g_h * sum_k softmax(a_h)_k * P_k``. The
weights are fitted by gradient descent on the KL divergence from the base model's
next-token distribution to the SA model's, on calibration text (distillation: the base
model is the teacher, so no label of the text is fitted).

It is a few hundred numbers per shared layer; a refit of each shared layer's output
projection, with tens of thousands, fitted the calibration text and lost on text of another
domain. Every fourth chunk of the calibration text is held out; the maps kept are those
with the least divergence there, among the start and every VALIDATE_EVERY steps (so the
fit never returns maps worse, on text it did not fit, than the ones it started from).
The benchmark (``python -m sa_export.benchmarks.head_maps``) judges the fit on both domains.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from sa_export.accuracy.adapters import LowRankAdapters
from sa_export.accuracy.layer_inputs import LayerInputs, first_changed_layer, free_bytes
from sa_export.accuracy.reference import shared_attention
from sa_export.core.choices import FIT_STEPS, FIT_STEPS_WITH_CORRECTIONS
from sa_export.core.errors import UsageError
from sa_export.core.plan import HeadMap, SharingPlan

FIT_CHUNKS_PER_STEP = 4
FIT_CHUNK_TOKENS = 256
FIT_LEARNING_RATE = 0.2
ADAPTER_LEARNING_RATE = 1e-2  # corrections of weights move far less than mixture logits; 120 steps at 1e-2 beat 240 at 1e-3 on news and code (README, heal)
WEIGHT_FLOOR = 0.01  # every source starts with a little weight, so that the fit can move to it
SEED = 0
HOLD_OUT_EVERY = 4  # every fourth chunk validates, when there are at least this many
VALIDATE_EVERY = 10
TEACHER_CACHE_BYTES = 6 << 30  # the base model's log-probabilities are kept when they fit in this (3 x 16,384 tokens of SmolLM2: 4.8 GB)
TEACHER_CACHE_SHARE = 0.5  # ... and in this share of the memory the device has free (an 8 GB Jetson)


def default_fit_steps(corrected: bool) -> int:
    """The steps a fit takes unless told: more when it also fits LoRA corrections."""
    return FIT_STEPS_WITH_CORRECTIONS if corrected else FIT_STEPS


class _FittedMaps(torch.nn.Module):
    """Per shared layer: [heads, sources] mixture logits and [heads] log gains."""

    def __init__(self, start: dict[int, HeadMap], heads: int, temperature: bool = False, borrowed: dict[int, tuple[int, ...]] | None = None):
        super().__init__()
        self.sources: dict[int, tuple[tuple[int, int], ...]] = {}
        self.logits = torch.nn.ParameterDict()
        self.log_gains = torch.nn.ParameterDict()
        self.log_temperatures = torch.nn.ParameterDict() if temperature else None
        borrowed = borrowed or {}  # heads of partly shared layers that borrow: no map reads them
        for layer, head_map in sorted(start.items()):
            sources = tuple((source, head) for source in head_map.layers for head in range(heads) if head not in borrowed.get(source, ()))
            weights = torch.full((head_map.num_heads, len(sources)), WEIGHT_FLOOR, dtype=torch.float64)
            for head, (pairs, start_weights) in enumerate(zip(head_map.sources, head_map.weights)):
                for pair, weight in zip(pairs, start_weights):
                    weights[head, sources.index(pair)] += weight
            self.sources[layer] = sources
            self.logits[str(layer)] = torch.nn.Parameter(torch.log(weights / weights.sum(1, keepdim=True)).float())
            self.log_gains[str(layer)] = torch.nn.Parameter(torch.zeros(head_map.num_heads, 1))
            if self.log_temperatures is not None:
                self.log_temperatures[str(layer)] = torch.nn.Parameter(torch.zeros(head_map.num_heads))

    def weights(self) -> dict[int, torch.Tensor]:
        """[heads, sources] weights of every layer: the mixture times the head's gain."""
        return {layer: torch.softmax(self.logits[str(layer)], 1) * torch.exp(self.log_gains[str(layer)]) for layer in self.sources}

    def temperatures(self, keep_grad: bool = False) -> dict[int, torch.Tensor] | None:
        """[heads] log-temperatures of every layer, when fitted (else detached copies)."""
        if self.log_temperatures is None:
            return None
        live = {layer: self.log_temperatures[str(layer)] for layer in self.sources}
        return live if keep_grad else {layer: value.detach().clone() for layer, value in live.items()}

    def head_maps(self) -> dict[int, HeadMap]:
        maps = {}
        for layer, weights in self.weights().items():
            rows = weights.detach().double().tolist()
            maps[layer] = HeadMap(tuple(self.sources[layer] for _ in rows), tuple(tuple(row) for row in rows))
        return maps


def fit_head_maps(
    model, plan: SharingPlan, token_ids: list[int], start: dict[int, HeadMap], steps: int = FIT_STEPS, progress=None
) -> dict[int, HeadMap]:
    """Maps for ``plan``'s shared layers, fitted from ``start`` by distillation on ``token_ids``."""
    return fit_maps_and_temperatures(model, plan, token_ids, start, steps, progress)[0]


def fit_maps_and_temperatures(
    model, plan: SharingPlan, token_ids: list[int], start: dict[int, HeadMap], steps: int = FIT_STEPS, progress=None, temperature: bool = False,
    adapters: LowRankAdapters | None = None, on_validate=None, adapter_learning_rate: float = ADAPTER_LEARNING_RATE,
    chunk_tokens: int = FIT_CHUNK_TOKENS, chunks_per_step: int = FIT_CHUNKS_PER_STEP, adapter_weight_decay: float = 0.0,
    hidden_weight: float = 0.0, soft_target_temperature: float = 1.0, seed: int = SEED, shared_heads: dict[int, tuple[int, ...]] | None = None,
) -> tuple[dict[int, HeadMap], dict[int, torch.Tensor] | None]:
    """``fit_head_maps``, and with ``temperature`` a per-head log-temperature fitted with the
    maps (see ``reference.mix_probs``; no graph applies it: it is measured, not shipped).
    ``adapters``, when given, are fitted with the maps (at ``adapter_learning_rate``) and left
    at the state kept with the best maps. ``on_validate(step, divergence)`` hears each
    held-out divergence (step 0: the start), to show whether more steps would still pay.
    ``adapter_weight_decay`` shrinks the corrections toward none at every step (AdamW's
    decoupled decay; the maps are never decayed). ``hidden_weight`` adds to the divergence
    that weight times the standardized squared distance (``_standardized_distance``) of the SA
    model's hidden states from the base model's, at the output of every layer from the first
    shared one on (the maps kept are still those of the least held-out divergence).
    ``soft_target_temperature`` flattens both distributions in the fit's divergence (``_kl``);
    the held-out divergence that picks the maps kept is always at 1. ``seed`` orders the chunks each step reads.
    ``shared_heads``: only these query heads of a layer borrow (``reference.shared_attention``;
    a plan's own partly shared layers need not be given)."""
    chunks = [token_ids[i : i + chunk_tokens] for i in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens)]
    if not chunks:
        raise UsageError(f"head map fit: the calibration text needs at least {chunk_tokens} tokens")
    if not start:
        return {}, None
    held_out = list(range(HOLD_OUT_EVERY - 1, len(chunks), HOLD_OUT_EVERY)) if len(chunks) >= HOLD_OUT_EVERY else []
    training = [i for i in range(len(chunks)) if i not in held_out]
    held_out = held_out or training  # too short to hold any out: validate on all
    fitted = _FittedMaps(start, next(iter(start.values())).num_heads, temperature, {**plan.shared_heads, **(shared_heads or {})}).to(model.device)
    structure = plan_with_fitted_maps(plan, fitted.head_maps(), shared_heads)  # the sources; weights come from ``fitted``
    changed = first_changed_layer(structure, adapters.layers if adapters is not None else ())
    teacher = _Teacher(model, chunks, min(plan.shared_layers) if hidden_weight else None, changed)
    groups = [{"params": list(fitted.parameters()), "lr": FIT_LEARNING_RATE, "weight_decay": 0.0}]
    if adapters is not None:
        groups.append({"params": list(adapters.parameters()), "lr": adapter_learning_rate, "weight_decay": adapter_weight_decay})
    optimizer = torch.optim.AdamW(groups)  # without decay, the same steps as Adam
    corrected = adapters.active if adapters is not None else contextlib.nullcontext
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # gradients only for the maps
        parameter.requires_grad_(False)
    try:
        def snapshot():
            return {k: v.detach().clone() for k, v in adapters.state_dict().items()} if adapters is not None else None

        best = (_divergence(teacher, plan_with_fitted_maps(plan, start, shared_heads), held_out, None, corrected, shared_heads), start, None, snapshot())
        if on_validate is not None:
            on_validate(0, best[0])
        for number in range(1, steps + 1):
            optimizer.zero_grad()
            picked = [training[i] for i in torch.randperm(len(training), generator=generator)[:chunks_per_step].tolist()]
            for index in picked:
                base = teacher.base_and_hidden(index)  # one read (or one run) of the base model for both terms
                with corrected(), shared_attention(model, structure, weights=fitted.weights(), log_temperatures=fitted.temperatures(keep_grad=True), shared_heads=shared_heads):
                    student = teacher.log_probs_and_hidden(index)
                loss = _kl(base[0], student[0], soft_target_temperature)
                if hidden_weight:
                    loss = loss + hidden_weight * _standardized_distance(base[1], student[1])
                (loss / len(picked)).backward()
            optimizer.step()
            if number % VALIDATE_EVERY == 0 or number == steps:
                maps, temperatures = fitted.head_maps(), fitted.temperatures()
                candidate = (_divergence(teacher, plan_with_fitted_maps(plan, maps, shared_heads), held_out, temperatures, corrected, shared_heads), maps, temperatures, snapshot())
                best = min(best, candidate, key=lambda entry: entry[0])
                if on_validate is not None:
                    on_validate(number, candidate[0])
            if progress is not None:
                progress(number, steps)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    if adapters is not None:
        adapters.load_state_dict(best[3])
    return best[1], best[2]


def plan_with_fitted_maps(plan: SharingPlan, maps: dict[int, HeadMap], shared_heads=None) -> SharingPlan:
    """``plan`` with ``maps``. Where only some heads borrow (``shared_heads``), a map may read
    the heads a partly shared layer keeps, which ``with_head_maps`` (whole layers) refuses:
    the caller's plan was built so (benchmarks.group_units.unit_plan)."""
    return plan.with_head_maps(maps) if shared_heads is None else dataclasses.replace(plan, head_maps=dict(maps))


class _Teacher:
    """The model's next-token log-probabilities on each calibration chunk.

    Called, it gives the base model's: computed once and kept (fp16) when all of them fit
    in ``teacher_cache_budget``, else computed again at each use (outside any SA block).
    ``log_probs`` runs the model as it is now: inside ``shared_attention``, the SA model,
    from layer ``changed_from`` (the first the fit changes) on the input the base model
    fed it (``layer_inputs``: the layers below are the base model's, and run once).
    With ``hidden_from``, ``base_and_hidden`` also gives the base model's hidden states at the output of
    that layer and every later one (kept alike: SmolLM2's are 38 MB a layer for 32,768 tokens).
    """

    def __init__(self, model, chunks: list[list[int]], hidden_from: int | None = None, changed_from: int = 0):
        self.model, self.chunks, self.hidden_from = model, chunks, hidden_from
        self.changed_from = changed_from
        self.inputs = LayerInputs(model, [changed_from])  # filled by each run of the base model
        first = self._base(0)
        self.kept = None
        per_chunk = sum(t.numel() for t in first) * 2
        if per_chunk * len(chunks) <= teacher_cache_budget(first[0].device):
            self.kept = [tuple(t.half() for t in first)] + [tuple(t.half() for t in self._base(i)) for i in range(1, len(chunks))]

    def __call__(self, index: int) -> torch.Tensor:
        return self.base_and_hidden(index, hidden=False)[0]

    def base_and_hidden(self, index: int, hidden: bool = True) -> tuple[torch.Tensor, ...]:
        """The base model's log-probabilities and, with ``hidden_from`` and ``hidden``, its hidden states."""
        if self.kept is None:
            return self._base(index, hidden)
        kept = self.kept[index] if hidden else self.kept[index][:1]
        return tuple(t.float() for t in kept)

    def log_probs(self, index: int) -> torch.Tensor:
        return self.log_probs_and_hidden(index, hidden=False)[0]

    def log_probs_and_hidden(self, index: int, hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities [tokens, vocab] and, with ``hidden_from`` and ``hidden``, hidden states [layers, tokens, width]."""
        collect = hidden and self.hidden_from is not None
        output, start = self.inputs.run(index, self._ids(index), self.changed_from, output_hidden_states=collect)
        return self._split(output, start if collect else None)

    def _ids(self, index: int) -> torch.Tensor:
        return torch.tensor([self.chunks[index]], device=self.model.device)

    def _split(self, output, start: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_probs = torch.log_softmax(output.logits[0].float(), -1)
        if start is None:
            return log_probs, None
        # hidden_states[0] enters the first layer run (``start``); [i + 1] is the output of layer start + i
        return log_probs, torch.stack([h[0].float() for h in output.hidden_states[self.hidden_from - start + 1 :]])

    @torch.no_grad()
    def _base(self, index: int, hidden: bool = True) -> tuple[torch.Tensor, ...]:
        """The base model's, run whole: its layer inputs are kept for the SA model's runs."""
        ids = self._ids(index)
        output = self.model(input_ids=ids, output_hidden_states=True)
        self.inputs.keep(index, ids, output)
        log_probs, states = self._split(output, 0 if hidden and self.hidden_from is not None else None)
        return (log_probs,) if states is None else (log_probs, states)


def teacher_cache_budget(device: torch.device) -> int:
    """Bytes of teacher log-probabilities to keep: TEACHER_CACHE_BYTES, or less where the
    device has less free memory (``MemAvailable`` for the CPU; unknown: the fixed budget)."""
    free = free_bytes(device)
    return TEACHER_CACHE_BYTES if free is None else min(TEACHER_CACHE_BYTES, int(free * TEACHER_CACHE_SHARE))


def _standardized_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean squared distance [layers, tokens, width] with each dimension standardized by the
    base model's variance over tokens, so that a few large dimensions do not drown the rest."""
    variance = teacher.var(1, keepdim=True) + 1e-6
    return ((student - teacher).pow(2) / variance).mean()


def _kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), both log-probabilities. Above 1,
    ``temperature`` flattens both first (soft targets: the tail of the teacher's distribution
    weighs more) and scales by its square, so that the gradient keeps its size."""
    if temperature != 1.0:
        teacher, student = (torch.log_softmax(t / temperature, -1) for t in (teacher, student))
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * temperature**2


@torch.no_grad()
def _divergence(
    teacher: _Teacher, plan: SharingPlan, chunks: list[int], log_temperatures: dict[int, torch.Tensor] | None = None,
    corrected=contextlib.nullcontext, shared_heads=None,
) -> float:
    total = 0.0
    for index in chunks:
        base = teacher(index)  # outside the blocks: recomputed, it must be the base model's
        with corrected(), shared_attention(teacher.model, plan, log_temperatures=log_temperatures, shared_heads=shared_heads):
            total += float(_kl(base, teacher.log_probs(index)))
    return total / len(chunks)

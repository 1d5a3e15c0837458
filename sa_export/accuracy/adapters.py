"""Low-rank corrections of shared layers' projections, fitted with their head maps.

A shared layer reads probabilities it did not compute; its own V and output projections
were trained for its own. A rank-r term ``B @ A`` added to each (LoRA: ``W x + B A x``)
lets distillation adapt them to the borrowed maps; the same term on the Q and K projections
of the layers it borrows from lets those make maps that serve it. Folded into the weights before export,
it costs nothing at decode: the graph keeps its MatMuls, with other numbers, and every
exporter and precision (int4 quantizes the corrected weights) takes it as it takes the
model. The factors are saved next to the graph (``CORRECTIONS_NAME``, safetensors) so that
`check` can rebuild the corrected reference from the user's own checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch

from sa_export.core.errors import UsageError

CORRECTIONS_NAME = "corrections.safetensors"

# The projections a shared layer keeps whole: V and the output projection. Its Q and K are
# dropped; the MLP's may be added (``projections=``), as they fold the same way.
PROJECTIONS = ("v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The projections of a layer that others read from: those that make its probabilities.
SOURCE_PROJECTIONS = ("q_proj", "k_proj")
_LAYER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def layer_linears(model, layers, projections) -> dict[str, torch.nn.Linear]:
    """``layer_projection`` -> the Linear named ``layers.{i}.self_attn|mlp.{projection}``."""
    found = {}
    for name, module in model.named_modules():
        match = _LAYER_LINEAR.search(name)
        if match and int(match[1]) in layers and match[2] in projections and isinstance(module, torch.nn.Linear):
            found[f"{match[1]}_{match[2]}"] = module  # ParameterDict keys take no dots
    missing = [f"{layer}_{p}" for layer in sorted(layers) for p in projections if f"{layer}_{p}" not in found]
    if missing:
        raise UsageError(f"{type(model).__name__} has no Linear for the corrections {', '.join(missing)}")
    return dict(sorted(found.items(), key=lambda item: _layer_order(item[0])))


class LowRankAdapters(torch.nn.Module):
    """Per corrected layer and projection, A [rank, in] (random) and B [out, rank] (zero):
    the correction starts at nothing, so the fit starts from the maps it is given."""

    def __init__(self, model, layers, rank: int, seed: int = 0, projections=PROJECTIONS):
        """Corrects ``projections`` of each of ``layers``; ``add`` takes others."""
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.targets: dict[str, torch.nn.Linear] = {}
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        self.add(model, dict.fromkeys(layers, tuple(projections)))

    def add(self, model, projections_by_layer: dict[int, tuple[str, ...]]) -> None:
        """Correct these projections too (those already corrected keep their factors)."""
        found = {}
        for layer, own in projections_by_layer.items():
            found.update(layer_linears(model, {layer}, own))
        for key, linear in sorted(found.items(), key=lambda item: _layer_order(item[0])):
            if key in self.targets:
                continue
            scale = 1 / math.sqrt(linear.in_features)
            self.down[key] = torch.nn.Parameter(torch.randn(self.rank, linear.in_features, generator=self.generator) * scale)
            self.up[key] = torch.nn.Parameter(torch.zeros(linear.out_features, self.rank))
        self.targets = dict(sorted({**self.targets, **found}.items(), key=lambda item: _layer_order(item[0])))
        self.to(next(model.parameters()).device)

    def add_sources(self, model, plan, projections=SOURCE_PROJECTIONS) -> None:
        """Correct the Q and K projections of every layer whose probabilities ``plan``'s
        shared layers read: they then compute maps that serve their readers as well as
        themselves (the fit weighs both). SmolLM2 26-29, fitted on news and code: the wiki
        penalty 0.34 -> 0.30 of identity's (README, heal)."""
        self.add(model, dict.fromkeys(plan.anchor_layers, tuple(projections)))

    @classmethod
    def averaged(cls, fits: list[LowRankAdapters]) -> LowRankAdapters:
        """Corrections whose every delta is the mean of ``fits``' (a soup of fits of the same
        targets): their factors stacked, so the rank is the sum of theirs and folding adds the mean."""
        if not fits or any(fit.targets.keys() != fits[0].targets.keys() for fit in fits):
            raise UsageError("averaged corrections need fits of the same projections")
        soup = cls.__new__(cls)
        torch.nn.Module.__init__(soup)
        soup.generator, soup.rank, soup.targets = None, sum(fit.rank for fit in fits), dict(fits[0].targets)
        soup.down = torch.nn.ParameterDict({key: torch.cat([fit.down[key].detach() for fit in fits]) for key in soup.targets})
        soup.up = torch.nn.ParameterDict({key: torch.cat([fit.up[key].detach() for fit in fits], 1) / len(fits) for key in soup.targets})
        return soup

    @contextlib.contextmanager
    def active(self):
        """Inside the block every target projection adds its correction."""
        handles = [linear.register_forward_hook(self._hook(key)) for key, linear in self.targets.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def scaled(self, factor: float):
        """Inside the block every correction is ``factor`` times the fitted one (B scaled):
        how much of the fit's step holds on text it did not read."""
        kept = {key: up.detach().clone() for key, up in self.up.items()}
        with torch.no_grad():
            for up in self.up.values():
                up.mul_(factor)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, up in self.up.items():
                    up.copy_(kept[key])

    def _hook(self, key: str):
        def add_correction(module, inputs, output):
            x = inputs[0]
            return output + (x @ self.down[key].to(x.dtype).T) @ self.up[key].to(x.dtype).T
        return add_correction

    def deltas(self) -> dict[str, torch.Tensor]:
        """``layer_projection`` -> B @ A, [out, in]: what folding adds to each weight."""
        return {key: (self.up[key] @ self.down[key]).detach() for key in self.targets}

    def fold(self, model) -> None:
        """Add each correction to its weight in ``model`` (the one hooked, or a copy of it),
        for good: it then computes what it computed inside ``active()``, with no hooks."""
        _add_deltas(model, self.deltas())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path) -> dict:
        """Write the factors (safetensors: no pickle); returns what the manifest records."""
        from safetensors.torch import save_file

        tensors = {}
        for key in self.targets:
            tensors[f"{key}.down"] = self.down[key].detach().float().cpu().contiguous()
            tensors[f"{key}.up"] = self.up[key].detach().float().cpu().contiguous()
        save_file(tensors, str(path))
        return {"file": Path(path).name, **self.record()}

    @property
    def layers(self) -> set[int]:
        """The layers whose projections are corrected."""
        return {_layer_order(key)[0] for key in self.targets}

    def record(self) -> dict:
        """What a report or manifest says of the corrections."""
        return {"rank": self.rank, "corrects": sorted(self.targets, key=_layer_order), "parameters": self.parameter_count()}


def _layer_order(key: str) -> tuple[int, str]:
    layer, projection = key.split("_", 1)
    return int(layer), projection


def fold_saved_corrections(model, directory, record: dict) -> None:
    """Fold the corrections a conversion saved (its manifest's ``record``) into ``model``."""
    from safetensors.torch import load_file

    if record.get("file") != CORRECTIONS_NAME:  # a name, never a path out of the directory
        raise UsageError(f"the manifest's corrections file is {record.get('file')!r}; sa-export writes {CORRECTIONS_NAME}")
    tensors = load_file(str(Path(directory) / CORRECTIONS_NAME))
    _add_deltas(model, {key: tensors[f"{key}.up"] @ tensors[f"{key}.down"] for key in record["corrects"]})


@torch.no_grad()
def _add_deltas(model, deltas: dict[str, torch.Tensor]) -> None:
    layers = {_layer_order(key)[0] for key in deltas}
    projections = {_layer_order(key)[1] for key in deltas}
    linears = layer_linears(model, layers, projections)
    for key, delta in deltas.items():
        weight = linears[key].weight
        weight.add_(delta.to(weight.device, weight.dtype))


def save_corrected_checkpoint(model, tokenizer, directory: Path, name: str):
    """``model`` (corrections folded) as a safetensors checkpoint with its tokenizer: what
    the exporters, which read checkpoints, take."""
    from transformers.utils import logging as hf_logging

    from sa_export.hf.models import ModelSource

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller's step line says it; a second bar would not
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return ModelSource("hf", Path(directory), name)

"""Low-rank corrections of shared layers' projections, fitted with their head maps.

A shared layer reads probabilities it did not compute; its own V and output projections
were trained for its own. A rank-r term ``B @ A`` added to each (LoRA: ``W x + B A x``)
lets distillation adapt them to the borrowed maps. Folded into the weights, it costs
nothing at decode: the graph keeps its MatMuls, with other numbers. It is measured here
(``benchmarks.heal``) before any graph pass applies it.
"""

from __future__ import annotations

import contextlib
import math

import torch

from sa_export.accuracy.reference import attention_modules

PROJECTIONS = ("v_proj", "o_proj")


class LowRankAdapters(torch.nn.Module):
    """Per shared layer and projection, A [rank, in] (random) and B [out, rank] (zero): the
    correction starts at nothing, so the fit starts from the maps it is given."""

    def __init__(self, model, layers, rank: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.targets: dict[str, torch.nn.Linear] = {}
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for module in attention_modules(model):
            if module.layer_idx not in layers:
                continue
            for name in PROJECTIONS:
                linear = getattr(module, name)
                key = f"{module.layer_idx}_{name}"  # ParameterDict keys take no dots
                self.targets[key] = linear
                scale = 1 / math.sqrt(linear.in_features)
                self.down[key] = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=generator) * scale)
                self.up[key] = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        self.to(next(model.parameters()).device)

    @contextlib.contextmanager
    def active(self):
        """Inside the block every target projection adds its correction."""
        handles = [linear.register_forward_hook(self._hook(key)) for key, linear in self.targets.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, key: str):
        def add_correction(module, inputs, output):
            x = inputs[0]
            return output + (x @ self.down[key].to(x.dtype).T) @ self.up[key].to(x.dtype).T
        return add_correction

    def deltas(self) -> dict[str, torch.Tensor]:
        """``layer_projection`` -> B @ A, [out, in]: what folding adds to each weight."""
        return {key: (self.up[key] @ self.down[key]).detach() for key in self.targets}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""Run a plan from the first layer it changes: the layers below run once per text.

A plan changes nothing below its lowest anchor, shared or corrected layer, so a measure of
it on a text (a perplexity in the frontier's search, a step of the fit) can start there,
from the hidden states the base model fed that layer. transformers runs a decoder from
``inputs_embeds`` over a shorter list of layers, and each layer keeps its own index, which
the SA reference reads. A model whose forward adds to ``inputs_embeds`` (GPT-2 adds its
position embeddings) would run wrong that way, so the first window is run both ways: where
the logits differ, every window runs whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from sa_export.core.plan import SharingPlan

SAME_LOGITS = 1e-4  # the two ways run the same layers on the same numbers: equal, or nearly on a GPU
KEEP_SHARE = 0.25  # of the memory the device has free, for one text's layer inputs
MEMINFO = "/proc/meminfo"


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free (``MemAvailable`` for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):  # psutil would be a dependency for this one number
        with open(MEMINFO) as meminfo:
            return 1024 * int(next(line.split()[1] for line in meminfo if line.startswith("MemAvailable:")))
    return None


def first_changed_layer(plan: SharingPlan | None, also: Iterable[int] = ()) -> int | None:
    """The lowest layer whose computation ``plan`` (and corrections of ``also``) touches:
    it borrows, or it lends probabilities, which the reference keeps as it runs. None where
    nothing changes (no plan): the base model, which may run from the last kept layer."""
    changed = [*plan.shared_layers, *plan.anchor_layers, *also] if plan is not None else [*also]
    return min(changed, default=None)


def _decoder_layers(model) -> tuple[torch.nn.Module, str] | None:
    """The module holding the decoder's ModuleList of layers, and its attribute name."""
    count = model.config.num_hidden_layers
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == count:
                return owner, name
    return None


class LayerInputs:
    """The hidden states the base model feeds ``layers``, per window of token ids.

    ``keep(index, output)`` takes them from a whole run of window ``index`` with
    ``output_hidden_states``; ``run(index, ids, start)`` runs the model as it is then
    (inside an SA block: the SA model) from the highest kept layer at or below ``start``.
    """

    def __init__(self, model, layers: Iterable[int]):
        self.model = model
        self.owner = _decoder_layers(model)
        self.layers = sorted({layer for layer in layers if layer > 0}) if self.owner is not None else []
        self.states: dict[tuple[int, int], torch.Tensor] = {}
        self.verified: bool | None = None  # None: not yet tried

    @classmethod
    @torch.no_grad()
    def of_windows(cls, model, windows: list[torch.Tensor], layers: Iterable[int]) -> LayerInputs:
        """Collected by one whole run of the base model over each window ([1, n] ids); where
        all of ``layers`` would take more than KEEP_SHARE of the free memory, every k-th of
        them (a plan then starts at the nearest kept layer below its first)."""
        from sa_export.accuracy.reference import shared_attention  # the reference imports the plan, not this module

        layers = sorted(layer for layer in layers if layer > 0)  # a plan from layer 0 runs whole
        parameter = next(model.parameters())
        per_layer = sum(ids.shape[1] for ids in windows) * model.config.hidden_size * parameter.element_size()
        free = free_bytes(parameter.device)
        if free is not None and layers:
            fit = max(int(free * KEEP_SHARE) // max(per_layer, 1), 0)
            layers = layers[:: -(-len(layers) // fit)] if fit else []
        inputs = cls(model, layers)
        if inputs.layers:
            with shared_attention(model, None):
                for index, ids in enumerate(windows):
                    inputs.keep(index, ids, model(input_ids=ids, output_hidden_states=True))
        return inputs

    def keep(self, index: int, ids: torch.Tensor, output) -> None:
        """Keep window ``index``'s layer inputs from ``output``, a whole run of the base model
        on ``ids`` with ``output_hidden_states`` (``hidden_states[i]`` enters layer i)."""
        for layer in self.layers:
            self.states[index, layer] = output.hidden_states[layer].detach()
        if self.verified is None and self.layers:
            with torch.no_grad():
                again, _ = self._from(self.layers[-1], index)
            self.verified = bool(torch.allclose(again.logits.float(), output.logits.float(), atol=SAME_LOGITS, rtol=SAME_LOGITS))

    def start_for(self, first_changed: int | None) -> int:
        """The layer a run for a plan changing ``first_changed`` on (None: nothing) starts from (0: whole)."""
        if not self.verified:
            return 0
        return max((layer for layer in self.layers if first_changed is None or layer <= first_changed), default=0)

    def run(self, index: int, ids: torch.Tensor, first_changed: int | None, **kwargs):
        """The model's output on window ``index`` (ids ``ids``), and the layer it started from:
        ``hidden_states``, when asked, then start with that layer's input."""
        start = self.start_for(first_changed)
        if start == 0 or (index, start) not in self.states:
            return self.model(input_ids=ids, **kwargs), 0
        return self._from(start, index, **kwargs)

    def _from(self, start: int, index: int, **kwargs):
        owner, name = self.owner
        layers = getattr(owner, name)
        with contextlib.ExitStack() as restore:
            setattr(owner, name, torch.nn.ModuleList(list(layers)[start:]))
            restore.callback(setattr, owner, name, layers)
            return self.model(inputs_embeds=self.states[index, start], **kwargs), start

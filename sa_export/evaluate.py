"""Perplexity of the base model and of its SA version (PyTorch reference) on the same text."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from sa_export.errors import EnvironmentProblem, UsageError
from sa_export.models import load_config, load_hf_model, load_tokenizer, resolve_model
from sa_export.plan import SharingPlan, build_plan
from sa_export.progress import step
from sa_export.resources import package_file
from sa_export.reference import shared_attention

# English news text available offline: the Lee background corpus that the gensim wheel ships.
DEFAULT_TEXT = ("gensim", "test/test_data/lee_background.cor")


def default_text_path() -> Path:
    """Locate the default text without importing gensim (its import is slow and not needed)."""
    package, relative = DEFAULT_TEXT
    path = package_file(package, relative)
    if path is None:
        raise EnvironmentProblem(f"the default evaluation text comes with {package}: pip install {package}, or pass --text FILE")
    return path


def read_text(path: str | None) -> tuple[str, str]:
    """(text, where it came from)."""
    file = Path(path) if path else default_text_path()
    if not file.is_file():
        raise UsageError(f"text file {file} not found; pass an existing --text FILE")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"text file {file} is empty")
    return text, str(file)


@torch.no_grad()
def perplexity(model, token_ids: list[int], context: int, plan: SharingPlan | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``context`` tokens."""
    total_nll = 0.0
    total = 0
    with shared_attention(model, plan):
        for start in range(0, len(token_ids) - 1, context):
            window = torch.tensor([token_ids[start : start + context]])
            if window.shape[1] < 2:
                break
            logits = model(input_ids=window).logits[0, :-1].float()
            targets = window[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            total_nll += float(nll)
            total += len(targets)
    return math.exp(total_nll / total)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    model: str
    plan: SharingPlan
    base_ppl: float
    sa_ppl: float
    eval_tokens: int
    calib_tokens: int
    context: int
    text_source: str
    kv_fraction_saved: float

    @property
    def delta(self) -> float:
        return self.sa_ppl - self.base_ppl

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "shared_layers": list(self.plan.shared_layers),
            "anchors": {str(k): v for k, v in self.plan.anchors.items()},
            "head_map": "identity" if not self.plan.head_maps else "calibrated",
            "base_ppl": self.base_ppl,
            "sa_ppl": self.sa_ppl,
            "ppl_delta": self.delta,
            "ppl_ratio": self.sa_ppl / self.base_ppl,
            "eval_tokens": self.eval_tokens,
            "calib_tokens": self.calib_tokens,
            "context": self.context,
            "text": self.text_source,
            "kv_fraction_saved": self.kv_fraction_saved,
        }


def evaluate(
    model: str, spans: list[str], anchors: list[int], text_file: str | None, max_tokens: int, context: int, force: bool = False
) -> EvalResult:
    source = resolve_model(model)
    if source.kind != "hf":
        raise UsageError("eval runs the PyTorch reference: give a Hugging Face model directory or alias, not ONNX")
    config = load_config(source)
    plan = build_plan(spans, config.num_hidden_layers, anchors, getattr(config, "layer_types", None), force)
    text, where = read_text(text_file)
    with step(f"loading {source.name}"):
        hf_model = load_hf_model(source)
        tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise UsageError(f"{source.name} has no tokenizer; eval needs one to read text")
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UsageError("the evaluation text has fewer than 2 tokens")
    with step(f"perplexity of the base model on {len(ids)} tokens"):
        base = perplexity(hf_model, ids, context)
    with step(f"perplexity of the SA model ({plan.describe()})"):
        sa = perplexity(hf_model, ids, context, plan)
    saved = len(plan.shared_layers) / (2 * plan.num_layers)
    return EvalResult(source.name, plan, base, sa, len(ids), 0, context, where, saved)

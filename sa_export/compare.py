"""Comparison results as data: per-output errors, the tolerance used, and the verdict.

Imports numpy only, so that any runtime can produce and read these reports.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_REL_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    atol: float | None
    min_cosine: float | None
    passed: bool

    @classmethod
    def of(cls, name: str, actual: np.ndarray, expected: np.ndarray, atol: float | None, min_cosine: float | None = None) -> OutputComparison:
        if actual.shape != expected.shape:
            raise ValueError(f"{name}: shape {actual.shape} does not match the reference {expected.shape}")
        actual = actual.astype(np.float64)
        expected = expected.astype(np.float64)
        diff = np.abs(actual - expected)
        rel = diff / (np.abs(expected) + _REL_EPS)
        max_abs = float(diff.max()) if diff.size else 0.0
        norms = float(np.linalg.norm(actual) * np.linalg.norm(expected))
        cosine = float((actual * expected).sum() / norms) if norms else 1.0
        return cls(
            name=name,
            max_abs=max_abs,
            mean_abs=float(diff.mean()) if diff.size else 0.0,
            max_rel=float(rel.max()) if rel.size else 0.0,
            mean_rel=float(rel.mean()) if rel.size else 0.0,
            cosine=cosine,
            atol=atol,
            min_cosine=min_cosine,
            passed=bool((atol is None or max_abs <= atol) and (min_cosine is None or cosine >= min_cosine)),
        )


@dataclasses.dataclass(frozen=True)
class Tolerance:
    name: str
    logits_atol: float | None
    cache_atol: float | None
    min_greedy_agreement: float
    min_cosine: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


FP32_TOLERANCE = Tolerance("fp32", logits_atol=1e-3, cache_atol=1e-3, min_greedy_agreement=1.0)
# fp16 against the fp32 reference: absolute errors are reported, the verdict uses
# direction (cosine) and decisions (greedy agreement).
FP16_TOLERANCE = Tolerance("fp16", logits_atol=None, cache_atol=None, min_greedy_agreement=0.99, min_cosine=0.999)
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}


@dataclasses.dataclass(frozen=True)
class ParityReport:
    backend: str
    tolerance: Tolerance
    comparisons: tuple[OutputComparison, ...]
    greedy_matches: int
    greedy_total: int
    decode_steps: int
    cases: tuple[str, ...]

    @property
    def greedy_agreement(self) -> float:
        return self.greedy_matches / self.greedy_total if self.greedy_total else 1.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and self.greedy_agreement >= self.tolerance.min_greedy_agreement

    def worst(self, prefix: str = "") -> OutputComparison:
        return max((c for c in self.comparisons if c.name.startswith(prefix) or prefix in c.name), key=lambda c: c.max_abs)

    @property
    def logits_max_abs(self) -> float:
        return max(c.max_abs for c in self.comparisons if c.name.endswith("logits"))

    @property
    def logits_min_cosine(self) -> float:
        return min(c.cosine for c in self.comparisons if c.name.endswith("logits"))

    def summary_line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        tol = self.tolerance
        limit = f"tolerance {tol.logits_atol:.0e}" if tol.logits_atol is not None else "reported only"
        cosine = f", logits cosine {self.logits_min_cosine:.5f} (min {tol.min_cosine})" if tol.min_cosine is not None else ""
        return (
            f"parity {verdict} ({self.backend} {tol.name} vs PyTorch SA reference): logits max abs err {self.logits_max_abs:.2e} "
            f"({limit}){cosine}, greedy agreement {self.greedy_matches}/{self.greedy_total} "
            f"({100 * self.greedy_agreement:.1f}%, min {100 * tol.min_greedy_agreement:.0f}%) over {self.decode_steps} decode steps"
        )

    def to_json(self) -> dict:
        failing = [c.name for c in self.comparisons if not c.passed]
        return {
            "passed": self.passed,
            "backend": self.backend,
            "tolerance": self.tolerance.to_json(),
            # The tightest logits tolerance this run would have passed (Polygraphy reports the same).
            "would_pass_logits_atol": self.logits_max_abs,
            "greedy_agreement": self.greedy_agreement,
            "greedy_matches": self.greedy_matches,
            "greedy_total": self.greedy_total,
            "decode_steps": self.decode_steps,
            "cases": list(self.cases),
            "failing_outputs": failing,
            "outputs": [dataclasses.asdict(c) for c in self.comparisons],
        }

    def summary_json(self) -> dict:
        return {
            "passed": self.passed,
            "backend": self.backend,
            "logits_max_abs": self.logits_max_abs,
            "logits_min_cosine": self.logits_min_cosine,
            "tolerance": self.tolerance.name,
            "greedy_agreement": self.greedy_agreement,
            "decode_steps": self.decode_steps,
        }

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
    atol: float
    passed: bool

    @classmethod
    def of(cls, name: str, actual: np.ndarray, expected: np.ndarray, atol: float) -> OutputComparison:
        if actual.shape != expected.shape:
            raise ValueError(f"{name}: shape {actual.shape} does not match the reference {expected.shape}")
        actual = actual.astype(np.float64)
        expected = expected.astype(np.float64)
        diff = np.abs(actual - expected)
        rel = diff / (np.abs(expected) + _REL_EPS)
        max_abs = float(diff.max()) if diff.size else 0.0
        return cls(
            name=name,
            max_abs=max_abs,
            mean_abs=float(diff.mean()) if diff.size else 0.0,
            max_rel=float(rel.max()) if rel.size else 0.0,
            mean_rel=float(rel.mean()) if rel.size else 0.0,
            atol=atol,
            passed=bool(max_abs <= atol),
        )


@dataclasses.dataclass(frozen=True)
class Tolerance:
    logits_atol: float
    cache_atol: float
    min_greedy_agreement: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


FP32_TOLERANCE = Tolerance(logits_atol=1e-3, cache_atol=1e-3, min_greedy_agreement=1.0)


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

    def summary_line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"parity {verdict} ({self.backend} vs PyTorch SA reference): logits max abs err {self.logits_max_abs:.2e} "
            f"(tolerance {self.tolerance.logits_atol:.0e}), greedy agreement {self.greedy_matches}/{self.greedy_total} "
            f"over {self.decode_steps} decode steps"
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
            "greedy_agreement": self.greedy_agreement,
            "decode_steps": self.decode_steps,
        }

"""Helpers for tests: run the CLI in-process and look for leftovers."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sa_export.cli import main


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def leftovers(out: Path) -> list[Path]:
    """Anything a failed run could have left: OUT itself or a partial sibling."""
    found = [out] if out.exists() else []
    return found + sorted(out.parent.glob(f".{out.name}.*"))


def move_fitted_corrections(monkeypatch) -> None:
    """Make `--head-map fit --lora-rank` end with random corrections: on the tiny random models
    the fit keeps its zero start, and what follows the fit (folding, saving, reporting) is
    then tested on corrections that change the model."""
    import torch

    from sa_export.accuracy import evaluate

    fit = evaluate.fit_maps_and_temperatures

    def fit_then_move(*args, adapters=None, **kwargs):
        found = fit(*args, adapters=adapters, **kwargs)
        with torch.no_grad():
            for parameter in adapters.up.values() if adapters is not None else ():
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        return found

    monkeypatch.setattr(evaluate, "fit_maps_and_temperatures", fit_then_move)

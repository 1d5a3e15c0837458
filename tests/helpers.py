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

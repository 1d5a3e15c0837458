"""Typed errors. Only the CLI turns these into exit codes and one-line messages."""

from __future__ import annotations


class SAExportError(Exception):
    """Base class of every error sa-export raises on purpose."""

    exit_code = 2


class UsageError(SAExportError):
    """Bad input: a path, a flag or a model that cannot be used (exit 2)."""


class PlanError(UsageError):
    """The sharing plan (spans, anchors, head maps) does not fit the model."""


class AttentionPatternError(UsageError):
    """An attention block in the graph does not have the structure the passes need."""

    def __init__(self, layer: int | None, reason: str):
        self.layer = layer
        self.reason = reason
        where = f"layer {layer}" if layer is not None else "graph"
        super().__init__(f"{where}: {reason}")


class EnvironmentProblem(SAExportError):
    """Something the machine lacks: a package, a GPU, TensorRT (exit 3)."""

    exit_code = 3


class CheckFailed(SAExportError):
    """A check ran and its result is a failure (exit 1)."""

    exit_code = 1


class ParityError(CheckFailed):
    """The converted model does not match the PyTorch SA reference."""

    def __init__(self, report):
        self.report = report
        super().__init__(report.summary_line())


class EngineBuildError(SAExportError):
    """TensorRT could not build an engine."""

    exit_code = 1


class DiskFull(UsageError):
    """The output's file system has no room (or a size limit) for what the command writes."""


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) arrived: unwinds like Ctrl-C, so that every
    `finally` removes its temporary work. Exit status 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)

"""Standard benchmarks through lm-evaluation-harness, on the base model and the SA reference.

Task data must be local: nothing is downloaded (HF_DATASETS_OFFLINE is forced), and a
task whose data is missing is reported as such, with what to do about it.
"""

from __future__ import annotations

import os

from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.core.plan import SharingPlan
from sa_export.accuracy.reference import shared_attention

INSTALL_HINT = "pip install 'sa-export[tasks]' (lm-evaluation-harness)"


def _harness():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EnvironmentProblem(f"--tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return simple_evaluate, HFLM, TaskManager


def _numeric_metrics(results: dict) -> dict[str, float]:
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "alias"}


def run_tasks(
    hf_model, tokenizer, plan: SharingPlan, tasks: list[str], include_path: str | None = None, limit: int | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {"base": metrics, "sa": metrics}} for each requested task."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    simple_evaluate, HFLM, TaskManager = _harness()
    manager = TaskManager(include_path=include_path, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}; list them with `lm-eval ls tasks`")
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=1, device="cpu")
    table: dict[str, dict[str, dict[str, float]]] = {t: {} for t in tasks}
    for label, active in (("base", None), ("sa", plan)):
        with shared_attention(hf_model, active):
            try:
                output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, verbosity="ERROR")
            except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
                # datasets raises these (or subclasses) when data is neither cached nor reachable.
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EnvironmentProblem(
                    f"data for task(s) {', '.join(tasks)} is not available offline ({first_line[:160]}); "
                    "put it in the Hugging Face datasets cache, or point --tasks-path at task YAMLs with local data files"
                ) from None
        for task in tasks:
            table[task][label] = _numeric_metrics(output["results"].get(task, {}))
    return table

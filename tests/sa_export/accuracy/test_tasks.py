"""eval --tasks through lm-evaluation-harness, on a task whose data is a local file."""

import json

import pytest

from tests.helpers import run_cli

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    with open(root / "data.jsonl", "w") as handle:
        for i in range(6):
            handle.write(json.dumps({"question": f"w{3 + i} w{4 + i}", "choices": [f"w{5 + i}", f"w{40 + i}"], "answer": 0}) + "\n")
    (root / "local_choice.yaml").write_text(
        "task: sa_local_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return root


def test_local_task_runs_on_base_and_sa(tiny_llama_with_tokenizer, local_task, tmp_path):
    result = run_cli(
        "eval", tiny_llama_with_tokenizer, "--span", "2-3", "--text", local_task / "data.jsonl",
        "--tasks", "sa_local_choice", "--tasks-path", local_task, "--json", tmp_path / "e.json",
    )
    assert result.exit_code == 0, result.output + result.stderr
    tasks = json.loads((tmp_path / "e.json").read_text())["tasks"]["sa_local_choice"]
    assert 0 <= tasks["base"]["acc,none"] <= 1 and 0 <= tasks["sa"]["acc,none"] <= 1


def test_missing_task_data_is_an_environment_error(tiny_llama_with_tokenizer, local_task):
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2", "--text", local_task / "data.jsonl", "--tasks", "hellaswag")
    assert result.exit_code == 3 and "not available offline" in result.stderr

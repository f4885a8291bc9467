"""The testbed as an lmms-eval task read from local files: `export_testbed_task` writes testbed items as Parquet
(an `image` column of images, question, answer, family, box, relevant tokens) next to a task YAML whose hooks
are the functions below. The task scores answers exactly as `visroute study` scores the `testbed` task.

    visroute lmms testbed-task --n 120 --out tasks/        # tasks/visroute_testbed.yaml + tasks/testbed.parquet
    lmms-eval --model visroute --model_args pretrained=testbed --tasks visroute_testbed --include_path tasks/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK_NAME = "visroute_testbed"

TASK_YAML = """\
# The visroute testbed from local files (written by `visroute lmms testbed-task`).
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function visroute.integrations.lmms.testbed_task.doc_to_visual
doc_to_text: !function visroute.integrations.lmms.testbed_task.doc_to_text
doc_to_target: answer
process_results: !function visroute.integrations.lmms.testbed_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  do_sample: false
"""


def export_testbed_task(items: list, out: str | Path, task: str = TASK_NAME) -> Path:
    """Write `items` (visroute.testbed Items) as `out/testbed.parquet` and the task YAML `out/<task>.yaml`;
    returns the YAML's path. The data path in the YAML is relative to it (lmms-eval resolves it there)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{
        "id": it.id, "image": it.image(), "question": it.question, "answer": it.answer, "family": it.family,
        "subtype": it.subtype, "template": it.template, "box": it.box, "grid": list(it.grid),
        "relevant_tokens": list(it.relevant_tokens),
    } for it in items]
    features = Features({
        "id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
        "family": Value("string"), "subtype": Value("string"), "template": Value("string"),
        "box": Sequence(Value("int64")), "grid": Sequence(Value("int64")), "relevant_tokens": Sequence(Value("int64")),
    })
    Dataset.from_list(rows, features=features).to_parquet(str(out / "testbed.parquet"))
    path = out / f"{task}.yaml"
    path.write_text(TASK_YAML.format(task=task, parquet="testbed.parquet"))
    return path


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def where_is(doc: dict) -> str:
    """The testbed's grounding question for a RefCOCO-layout document (its referring expression)."""
    return f"where is the {doc['answer']}?"


def _task_item(doc: dict):
    from visroute.evaluation.tasks.base import TaskItem

    rows, cols = doc["grid"]
    box = doc.get("box")
    norm = [box[0] / cols, box[1] / rows, box[2] / cols, box[3] / rows] if box else None
    return TaskItem(id=doc["id"], question=doc["question"], answers=[doc["answer"]], kind="box" if box else "short",
                    box=norm, meta={"family": doc["family"]})


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """The testbed's score of one answer (visroute.evaluation's `testbed` task): exact match of the
    whitespace-normalised answer; a box, correct at IoU >= 0.5 in grid units."""
    from visroute.evaluation.tasks.testbed import TestbedTask, grid_frame

    scored = TestbedTask().score(_task_item(doc), results[0], grid_frame(tuple(doc["grid"])))
    return {"accuracy": float(scored["correct"])}

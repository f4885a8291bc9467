"""`jsonl`: a generic task from a JSON Lines (or JSON / Parquet) file with one row per question:
`image` (a path relative to the file, or an image), `question`, `answer` (a string or a list of strings), and
optionally `id`, `metric` (per row, else the task option) and `box` (normalised x1 y1 x2 y2, for `box_iou`).

Metrics: `exact_match` (lmms-eval normalisation), `yes_no` (POPE's LLaVA rule), `number` (the last integer),
`box_iou` (IoU >= 0.5 after converting the model's answer frame)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, answer_list, plain_rows, read_table, row_images

COLUMNS = ("image", "question", "answer")


def _last_int(text: str) -> int | None:
    nums = re.findall(r"-?\d+", text)
    return int(nums[-1]) if nums else None


METRICS = {
    "exact_match": lambda item, pred: M.exact_match(pred, item.answers),
    "yes_no": lambda item, pred: M.pope_label_llava(pred) == M.normalize_exact(item.answers[0]),
    "number": lambda item, pred: _last_int(pred) is not None and _last_int(pred) == _last_int(item.answers[0]),
}
KINDS = {"exact_match": "short", "yes_no": "yesno", "number": "count", "box_iou": "box"}


@register_task
class JsonlTask(Task):
    name = "jsonl"
    description = "generic rows: image path, question, answer, metric (exact_match, yes_no, number, box_iou)"
    instruction = ""
    max_new_tokens = 16
    options = {"metric": ("exact_match", f"the metric of rows without one: {', '.join(KINDS)}"),
               "split": (None, "the split of a datasets folder")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_metric(self.opts["metric"], "option metric")

    def _check_metric(self, metric: str, where: str) -> None:
        if metric not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown metric {metric!r} ({where}); metrics: {', '.join(KINDS)}")

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        out = []
        for i, r in enumerate(plain_rows(ds)[:limit]):
            metric = r.get("metric") or self.opts["metric"]
            self._check_metric(metric, f"row {i + 1} of {path}")
            answers = answer_list(r.get("answer"))
            box = r.get("box")
            if metric == "box_iou" and box is None:
                raise ValueError(f"task {self.name!r}: row {i + 1} of {path} asks for box_iou but has no box")
            out.append(TaskItem(id=str(r.get("id") if r.get("id") is not None else i), question=r.get("question"),
                                answers=answers, kind=KINDS[metric],
                                box=[float(v) for v in box] if box is not None else None, meta={"metric": metric},
                                images=row_images(ds, i, "image", path.parent)))
        return out

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        metric = item.meta["metric"]
        if metric == "box_iou":
            return {"metric": metric, **self.score_box(item, prediction, frame)}
        return {"metric": metric, "correct": bool(METRICS[metric](item, prediction))}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        metrics = sorted({r["metric"] for r in rows})
        if len(metrics) > 1:
            for m in metrics:
                out[f"accuracy_{m}"] = float(np.mean([r["correct"] for r in rows if r["metric"] == m]))
        return out

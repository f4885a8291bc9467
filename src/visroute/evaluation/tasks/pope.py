"""`pope`: object-hallucination yes/no questions (POPE), in the public column layout
`question_id, question, answer, image, category` (category: adversarial, popular, random).

Both normalisations are stored per item: LLaVA's (the first sentence holds "no" / "not": no, else yes) and
lmms-eval's (the answer must be exactly "yes" or "no"); `normalization` chooses which one `correct` and the
unprefixed metrics follow."""

from __future__ import annotations

from typing import Any

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, plain_rows, read_table, row_images

COLUMNS = ("question_id", "question", "answer", "image", "category")


@register_task
class PopeTask(Task):
    name = "pope"
    description = "POPE object hallucination: yes/no; accuracy, precision, recall, F1, predicted-yes ratio"
    instruction = "\nAnswer the question using a single word or phrase."
    max_new_tokens = 16
    options = {"normalization": ("llava", "llava or lmms: how an answer is read as yes / no"),
               "split": (None, "the split of a datasets folder")}
    headline = ("f1", "yes_ratio")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.opts["normalization"] not in ("llava", "lmms"):
            raise ValueError(f"task 'pope': normalization must be 'llava' or 'lmms', "
                             f"not {self.opts['normalization']!r}")

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        rows = plain_rows(ds)[:limit]
        return [TaskItem(id=str(r["question_id"]), question=r["question"], answers=[str(r["answer"]).lower()],
                         kind="yesno", meta={"category": r["category"]}, images=row_images(ds, i, "image", path.parent))
                for i, r in enumerate(rows)]

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        llava, lmms = M.pope_label_llava(prediction), M.pope_label_lmms(prediction)
        label = item.answers[0]
        chosen = llava if self.opts["normalization"] == "llava" else lmms
        return {"correct": chosen == label, "label": label, "llava": llava, "lmms": lmms,
                "category": item.meta["category"]}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        labels = [r["label"] for r in rows]
        chosen, other = self.opts["normalization"], {"llava": "lmms", "lmms": "llava"}[self.opts["normalization"]]
        out = M.pope_metrics([r[chosen] for r in rows], labels)
        out.update({f"{other}_{k}": v for k, v in M.pope_metrics([r[other] for r in rows], labels).items()})
        for cat in sorted({r["category"] for r in rows}):
            sub = [r for r in rows if r["category"] == cat]
            out[f"f1_{cat}"] = M.pope_metrics([r[chosen] for r in sub], [r["label"] for r in sub])["f1"]
        return out

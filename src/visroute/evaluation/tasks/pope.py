"""`pope`: object-hallucination yes/no questions (POPE), in the public column layout
`question_id, question, answer, image, category` (category: adversarial, popular, random). Items are keyed by
`question_id`, or, where it repeats across the categories, by the Hub copy's `id` or by category + question_id.

Both normalisations are stored per item: LLaVA's (the first sentence holds "no" / "not": no, else yes) and
lmms-eval's (the answer must be exactly "yes" or "no"); `normalization` chooses which one `correct` and the
unprefixed metrics follow."""

from __future__ import annotations

from typing import Any

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, answer_list, plain_rows, read_table, row_images

COLUMNS = ("question_id", "question", "answer", "image", "category")


def item_ids(rows: list[dict[str, Any]]) -> list[str]:
    """Item ids as the layout allows: `question_id` when it is unique; else the Hub copy's running `id`; else
    category + question_id (the original POPE files number their questions 1-3000 within each category)."""
    for key in (lambda r: str(r["question_id"]), lambda r: None if r.get("id") is None else str(r["id"]),
                lambda r: f"{r['category']}-{r['question_id']}"):
        ids = [key(r) for r in rows]
        if None not in ids and len(set(ids)) == len(ids):
            return ids
    return [str(r["question_id"]) for r in rows]  # Task.items names the repeated id


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
        rows = plain_rows(ds)
        ids = item_ids(rows)[:limit]
        # the reference answer read as lmms-eval reads it (lower-cased, stripped)
        return [TaskItem(id=ids[i], question=r["question"],
                         answers=[a.strip().lower() for a in answer_list(r["answer"])], kind="yesno",
                         meta={"category": r["category"]}, images=row_images(ds, i, "image", path.parent))
                for i, r in enumerate(rows[:limit])]

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

"""`mme`: MME yes/no questions, two per image, in the public layout `question_id, image, question, answer,
category` (question_id names the image). Scores: per category 100 acc + 100 acc+ (acc+: both questions of an
image right), perception and cognition sums. Intervals resample whole images."""

from __future__ import annotations

from collections import Counter
from typing import Any

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, answer_list, plain_rows, read_table, row_images

COLUMNS = ("question_id", "image", "question", "answer", "category")
_OWN_INSTRUCTION = " Please answer yes or no."


@register_task
class MmeTask(Task):
    name = "mme"
    description = "MME perception and cognition: acc + acc+ per category"
    instruction = "\nAnswer the question using a single word or phrase."
    max_new_tokens = 16
    options = {"split": (None, "the split of a datasets folder")}
    cluster_key = "image"
    headline = ("perception", "cognition")

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        rows = plain_rows(ds)[:limit]
        seen: Counter = Counter()
        out = []
        for i, r in enumerate(rows):
            qid = str(r["question_id"])
            seen[qid] += 1
            question = (r["question"] or "").strip()
            if question.endswith(_OWN_INSTRUCTION.strip()):  # lmms-eval replaces MME's own instruction with its own
                question = question[: -len(_OWN_INSTRUCTION.strip())].rstrip()
            answers = [a.strip().lower() for a in answer_list(r["answer"])]
            out.append(TaskItem(id=f"{qid}#{seen[qid]}", question=question, answers=answers,
                                kind="yesno", meta={"category": r["category"], "image": qid},
                                images=row_images(ds, i, "image", path.parent)))
        return out

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        label = M.mme_label(prediction)
        return {"correct": label == item.answers[0], "pred": label, "category": item.meta["category"],
                "image": item.meta["image"]}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        out.update(M.mme_scores([(r["category"], r["image"], r["correct"]) for r in rows]))
        return out

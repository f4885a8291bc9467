"""`refcoco` (also `refcoco+`, `refcocog`): referring-expression comprehension as box answers, in the public
layout: rows with `question_id`, `image`, `bbox` ([x, y, w, h] in pixels of the image) and `answer`, the list
of referring expressions of that box (one item per expression). The box is scored in the original image's
normalised frame after converting the model's answer frame (so Qwen2.5-VL's pixel boxes and LLaVA's normalised
ones are both right); relevance is the true box, mapped to each model's tokens."""

from __future__ import annotations

from typing import Any

from visroute.evaluation import metrics as M
from visroute.evaluation.boxes import xywh_to_xyxy
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, plain_rows, read_table, row_images, to_image

COLUMNS = ("question_id", "image", "bbox", "answer")
FULL_PROMPT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
               "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
               "bounding box coordinate of the region this sentence describes: {expression}")


class RefcocoTask(Task):
    name = "refcoco"
    description = "RefCOCO / RefCOCO+ / RefCOCOg box answers: IoU, ACC@0.1-0.9, centre accuracy"
    instruction = ""
    max_new_tokens = 32
    options = {"prompt": (FULL_PROMPT, "the question, with {expression} for the referring expression"),
               "split": (None, "the split of a datasets folder")}
    headline = ("iou", "center_acc")

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        out: list[TaskItem] = []
        for i, r in enumerate(plain_rows(ds)):
            if limit is not None and len(out) >= limit:
                break
            image = to_image(ds[i]["image"], path.parent)  # the image size converts the pixel box
            box = xywh_to_xyxy(r["bbox"], *image.size)
            expressions = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
            images = row_images(ds, i, "image", path.parent)
            for k, expr in enumerate(expressions):
                out.append(TaskItem(id=f"{r['question_id']}#{k}", question=self.opts["prompt"].format(expression=expr),
                                    answers=[], kind="box", box=box, images=images))
        return out

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        return self.score_box(item, prediction, frame)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        out.update(M.rec_metrics([r["iou"] for r in rows], [r["center"] for r in rows]))
        return out


register_task(RefcocoTask, "refcoco+", "refcocog")

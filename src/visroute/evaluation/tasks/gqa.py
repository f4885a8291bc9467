"""`gqa`: GQA (testdev-balanced) in the public layout: question rows `id, imageId, question, answer` and, unless
the rows carry an `image` column, an image table `id, image` (data key `images`). Exact match after lmms-eval's
normalisation (case and punctuation ignored), or LLaVA's (`normalization: llava`: trailing "." stripped,
lower-cased)."""

from __future__ import annotations

from typing import Any

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, answer_list, plain_rows, read_table, to_image

COLUMNS = ("id", "imageId", "question", "answer")


@register_task
class GqaTask(Task):
    name = "gqa"
    description = "GQA compositional questions: exact match"
    instruction = "\nAnswer the question using a single word or phrase."
    max_new_tokens = 16
    options = {"normalization": ("lmms", "lmms (case and punctuation ignored) or llava (trailing '.' stripped)"),
               "split": (None, "the split of a datasets folder")}
    data_keys = ("data", "images")

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        rows = plain_rows(ds)[:limit]
        if "image" in ds.column_names:
            def loader(i, root=path.parent):
                return lambda: [to_image(ds[i]["image"], root)]
            images = [loader(i) for i in range(len(rows))]
        else:
            if "images" not in self.data:
                raise ValueError(f"task 'gqa': {path} has no image column; give the image table as data key "
                                 f"'images' (--data gqa.images=PATH)")
            ipath = self.path("images")
            its = read_table(ipath, self.name, ("id", "image"), self.opts["split"])
            index = {str(v): i for i, v in enumerate(its["id"])}
            missing = sorted({str(r["imageId"]) for r in rows} - set(index))
            if missing:
                raise ValueError(f"task 'gqa': {ipath} lacks the images {missing[:5]} of {len(missing)} questions")

            def loader(image_id, root=ipath.parent):
                return lambda: [to_image(its[index[image_id]]["image"], root)]
            images = [loader(str(r["imageId"])) for r in rows]
        return [TaskItem(id=str(r["id"]), question=r["question"], answers=answer_list(r["answer"]), kind="short",
                         meta={"image": str(r["imageId"])}, images=img) for r, img in zip(rows, images)]

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        norm = M.normalize_llava_gqa if self.opts["normalization"] == "llava" else M.normalize_exact
        return {"correct": M.exact_match(prediction, item.answers, norm)}

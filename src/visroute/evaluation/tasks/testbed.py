"""`testbed`: the synthetic grounded-VQA questions of `visroute.testbed`, with their relevant tokens per hop.

Data: a `visroute testbed make` folder (or its items.jsonl), or none: then `n` items of the set `seed` are
generated (default: the held-out set). Scoring is the testbed's: exact match of the whitespace-normalised answer;
grounding answers are boxes, correct at IoU >= 0.5 with the true box. Relevance: each hop's relevant patches, as
boxes of the image, so that a model of any grid maps them onto its own tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem
from visroute.families import ImageFrame
from visroute.testbed import DEFAULT_WORLD
from visroute.testbed.data import HELDOUT_SEED, make_items, read_dataset
from visroute.testbed.scenes import IMAGE_SIZE


def patch_boxes(tokens: list[int], rows: int, cols: int) -> list[list[float]]:
    """The cells of `tokens` (row-major indices of a rows x cols grid) as normalised boxes of the image."""
    return [[(t % cols) / cols, (t // cols) / rows, (t % cols + 1) / cols, (t // cols + 1) / rows] for t in tokens]


def grid_frame(grid: tuple[int, int]) -> Any:
    """The ImageFrame of a testbed image on a model whose token grid is the scene's (the testbed model):
    boxes in grid units."""
    rows, cols = grid
    return ImageFrame(width=IMAGE_SIZE, height=IMAGE_SIZE, view=(0.0, 0.0, float(IMAGE_SIZE), float(IMAGE_SIZE)),
                      rows=rows, cols=cols, canvas=(IMAGE_SIZE, IMAGE_SIZE), box_frame="grid")


def hops_of(item) -> list[list[int]]:
    """The relevant tokens per hop (one hop, `relevant_tokens`, for items without `hops`)."""
    hops = getattr(item, "hops", None)
    return [list(h) for h in hops] if hops else [list(item.relevant_tokens)]


def to_task_item(it) -> TaskItem:
    """A TaskItem from a `visroute.testbed.Item`."""
    rows, cols = it.grid
    box = None
    if it.box is not None:
        x1, y1, x2, y2 = it.box
        box = [x1 / cols, y1 / rows, x2 / cols, y2 / rows]
    return TaskItem(
        id=it.id, question=it.question, answers=[it.answer], kind="box" if it.box is not None else "short",
        box=box, hops=[patch_boxes(h, rows, cols) for h in hops_of(it)],
        meta={"family": it.family, "subtype": it.subtype, "template": it.template}, images=lambda it=it: [it.image()],
    )


@register_task
class TestbedTask(Task):
    name = "testbed"
    description = "synthetic grounded VQA with known relevant tokens (visroute.testbed)"
    instruction = ""  # the testbed model is trained on the bare questions
    max_new_tokens = 5  # the longest answer (a box) is 4 tokens, then </s>
    options = {"n": (300, "items to generate when no data is given"),
               "seed": (None, "seed of the generated set (default: the held-out seed)"),
               "families": (None, "question families to keep (default: all)"),
               "world": (DEFAULT_WORLD, "scene generator of the generated set: 3 (textures, clutter, distractors, "
                                        "lures; the shipped model's world), or 2 (plain scenes)")}
    required_keys = ()

    def load(self, limit: int | None) -> list[TaskItem]:
        fams = self.opts["families"]
        if "data" in self.data:
            items = read_dataset(self.path())
            if fams:
                items = [it for it in items if it.family in fams]
        else:
            seed = HELDOUT_SEED if self.opts["seed"] is None else int(self.opts["seed"])
            n = int(self.opts["n"]) if limit is None else min(int(self.opts["n"]), limit)
            world = int(self.opts["world"])
            if world not in (2, 3):
                raise ValueError(f"testbed task: world must be 2 or 3, got {self.opts['world']!r}")
            items = make_items(n, seed, fams, world=world)
        return [to_task_item(it) for it in items[:limit]]

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        out: dict[str, Any] = {"family": item.meta["family"]}
        if item.kind == "box":
            out.update(self.score_box(item, prediction, frame))
        else:
            out["correct"] = " ".join(prediction.split()) == item.answers[0]
        return out

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        fams = sorted({r["family"] for r in rows})
        for f in fams:
            out[f"accuracy_{f}"] = float(np.mean([r["correct"] for r in rows if r["family"] == f]))
        return out

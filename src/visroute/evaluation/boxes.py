"""Boxes in answers: parsing, IoU and centre accuracy.

Every task scores boxes as (x1, y1, x2, y2) normalised to the original image ([0, 1] on each axis). A model
writes boxes in its own answer frame (`ImageFrame.box_frame`: normalised over the processed image, pixels of the
resized image, [0, 1000), or token-grid units); `ImageFrame.from_answer` brings them into the task's frame, so
no task needs to know which model answered."""

from __future__ import annotations

import re

_NUMBER = r"-?\d+(?:\.\d+)?"
_BRACKETED = re.compile(rf"[\[(]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\])]")
_BOXED = re.compile(r"\\boxed\{([^}]*)\}")


def parse_box(text: str) -> list[float] | None:
    """The box an answer gives, in the answer's own frame, or None.

    Read in this order: the last `\\boxed{...}` holding four numbers (DatBench), the first `[a, b, c, d]` or
    `(a, b, c, d)` (lmms-eval's REC parser; Qwen's tuples), else an answer of exactly four numbers separated by
    spaces or commas ("x1 y1 x2 y2", the testbed model's form)."""
    for inner in reversed(_BOXED.findall(text)):
        nums = re.findall(_NUMBER, inner)
        if len(nums) >= 4:
            return [float(v) for v in nums[:4]]
    m = _BRACKETED.search(text)
    if m:
        return [float(v) for v in m.groups()]
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if len(parts) == 4 and all(re.fullmatch(_NUMBER, p) for p in parts):
        return [float(p) for p in parts]
    return None


def answer_box(text: str, frame) -> list[float] | None:
    """The box an answer gives (`parse_box`), brought from the model's answer frame into the task's (`frame`, the
    item's `ImageFrame`: normalised x1, y1, x2, y2 of the original image), or None when it gives none."""
    box = parse_box(text)
    return None if box is None else [float(v) for v in frame.from_answer(box)]


def xywh_to_xyxy(box, width: float, height: float) -> list[float]:
    """[x, y, w, h] in pixels (COCO) -> normalised [x1, y1, x2, y2]."""
    x, y, w, h = (float(v) for v in box)
    return [x / width, y / height, (x + w) / width, (y + h) / height]


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union is empty. A box with x2 <= x1
    or y2 <= y1 has no area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def center_inside(pred, gt) -> bool:
    """The predicted box's centre lies inside the ground-truth box (edges included)."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]

"""Metric values on fixed predictions, against hand-computed expectations."""

import math

import numpy as np
import pytest
from PIL import Image

from visroute.evaluation import metrics as M
from visroute.evaluation.boxes import box_iou, center_inside, parse_box, xywh_to_xyxy
from visroute.evaluation.tasks import build_task
from visroute.evaluation.tasks.base import TaskItem


def test_exact_match_normalisation():
    # lmms-eval: case and every punctuation mark ignored, surrounding space stripped
    assert M.exact_match("  Hot-dog. ", ["hotdog"])
    assert M.exact_match("Yes!", ["yes"])
    assert not M.exact_match("hot dog", ["hotdog"])
    # LLaVA's GQA conversion strips trailing full stops only
    assert M.exact_match("Table.", ["table"], M.normalize_llava_gqa)
    assert not M.exact_match("hot-dog", ["hotdog"], M.normalize_llava_gqa)


def test_pope_precision_recall_both_normalisations():
    preds = ["Yes, there is a dog.", "No.", "yes", "There is not a cat", "no", "Yes"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    llava = [M.pope_label_llava(p) for p in preds]
    assert llava == ["yes", "no", "yes", "no", "no", "yes"]
    m = M.pope_metrics(llava, labels)
    # TP = 2 (0, 2), FP = 1 (5), FN = 1 (1), TN = 2
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # share of *predicted* yes
    lmms = [M.pope_label_lmms(p) for p in preds]
    assert lmms == ["other", "other", "yes", "other", "no", "yes"]
    m = M.pope_metrics(lmms, labels)
    # "other" is wrong and left out of P/R: right are 2 and 4; TP = 1 (2), FP = 1 (5), FN = 0
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1.0)
    assert m["yes_ratio"] == pytest.approx(2 / 6)


def test_pope_task_scores_with_chosen_normalisation():
    item = TaskItem("1", "is there a dog?", ["yes"], kind="yesno", meta={"category": "random"})
    llava, lmms = build_task("pope"), build_task("pope", normalization="lmms")
    assert llava.score(item, "Yes, a dog.", None)["correct"]
    assert not lmms.score(item, "Yes, a dog.", None)["correct"]


def test_mme_acc_plus():
    assert [M.mme_label(t) for t in ["Yes.", "n", "No, it is not", "maybe", "y"]] == ["yes", "no", "no", "other", "yes"]
    rows = [("color", "a.jpg", True), ("color", "a.jpg", True),    # image a: both right
            ("color", "b.jpg", True), ("color", "b.jpg", False),   # image b: one right
            ("code_reasoning", "c.png", False), ("code_reasoning", "c.png", False)]
    s = M.mme_scores(rows)
    # color: acc = 3/4, acc+ = 1/2 -> 75 + 50; code_reasoning: 0 + 0
    assert s["color"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == pytest.approx(0.0)


def test_boxes():
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == [0.1, 0.2, 0.5, 0.6]
    assert parse_box("The box is (12,30,200,310).") == [12, 30, 200, 310]
    assert parse_box("10 2 11 3") == [10, 2, 11, 3]
    assert parse_box(r"so \boxed{[1, 2, 3, 4]} or [5, 6, 7, 8]") == [1, 2, 3, 4]
    assert parse_box("a dog") is None and parse_box("1 2 3") is None
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 1, 1]) == 0.0  # degenerate box: no area
    assert center_inside([0.4, 0.4, 0.6, 0.6], [0.0, 0.0, 0.5, 0.5])
    assert xywh_to_xyxy([10, 20, 30, 40], 100, 200) == [0.1, 0.1, 0.4, 0.3]
    m = M.rec_metrics([0.5, 0.2, 0.95], [True, False, True])
    assert m["acc@0.5"] == pytest.approx(2 / 3) and m["acc@0.9"] == pytest.approx(1 / 3)
    assert m["iou"] == pytest.approx(0.55) and m["center_acc"] == pytest.approx(2 / 3)


def test_qwen_pixel_box_is_scored_in_the_original_frame():
    """Qwen2.5-VL answers in pixels of the processor-resized image: a 640 x 480 image becomes 644 x 476 (46 x 34
    patches of 14). Its box of the true region scores IoU 1 once converted; dividing by the original size, as a
    harness without the frame would, does not."""
    from tiny import tiny_qwen

    from visroute.families import adapter_for

    import torch

    adapter = adapter_for(tiny_qwen("2.5"))
    image = Image.new("RGB", (640, 480))
    patch = adapter.model.config.vision_config.patch_size
    frame = adapter.image_frames(None, [image], {"image_grid_thw": torch.tensor([[1, 34, 46]])}, box_frame="pixels")[0]
    assert frame.canvas == (46 * patch, 34 * patch)
    truth = [0.25, 0.25, 0.5, 0.75]  # normalised, original image
    w, h = frame.canvas
    answer = f"({truth[0] * w:.0f},{truth[1] * h:.0f}),({truth[2] * w:.0f},{truth[3] * h:.0f})"
    task = build_task("refcoco")
    item = TaskItem("1", "the dog", [], kind="box", box=truth)
    text = "[" + answer.replace("(", "").replace(")", "") + "]"
    scored = task.score(item, text, frame)
    assert scored["iou"] > 0.99 and scored["correct"]
    naive = [v / s for v, s in zip(parse_box(text), (640, 480, 640, 480))]
    assert box_iou(naive, truth) < scored["iou"]
    # the same region in LLaVA-1.5's normalised frame
    assert task.score(item, "[0.25, 0.25, 0.5, 0.75]", frame.__class__(
        width=640, height=480, view=(0.0, 0.0, 640.0, 480.0), rows=24, cols=24, canvas=(336, 336),
        box_frame="normalized"))["iou"] == pytest.approx(1.0)


def test_bootstrap_intervals():
    x = np.array([1.0] * 30 + [0.0] * 70)
    lo, hi = M.bootstrap_ci(x, seed=3)
    assert lo < 0.3 < hi and (lo, hi) == M.bootstrap_ci(x, seed=3)  # seeded: reproducible
    assert 0.18 < lo < 0.24 and 0.36 < hi < 0.42  # the normal approximation gives 0.21 .. 0.39
    d, dlo, dhi = M.paired_bootstrap_diff(x, x)
    assert d == dlo == dhi == 0.0
    y = np.roll(x, 5)
    d, dlo, dhi = M.paired_bootstrap_diff(np.ones(100), y)
    assert d == pytest.approx(0.7) and dlo < 0.7 < dhi
    # clusters: whole groups are resampled together; pairs of equal values carry half the information of
    # independent items, so the interval is wider by about sqrt(2)
    values = [v for v in [1.0] * 25 + [0.0] * 25 for _ in range(2)]
    pairs = [i // 2 for i in range(100)]
    lo_i, hi_i = M.bootstrap_ci(values, seed=0)
    lo_c, hi_c = M.bootstrap_ci(values, clusters=pairs, seed=0)
    assert 1.25 < (hi_c - lo_c) / (hi_i - lo_i) < 1.6


def test_visual_gain_retained():
    assert M.visual_gain_retained(0.7, 0.9, 0.5) == pytest.approx(0.5)
    assert math.isnan(M.visual_gain_retained(0.7, 0.5, 0.5))

"""Metrics as small pure functions, and bootstrap intervals.

Answer normalisation follows each benchmark's usual scorer:

* exact match (lmms-eval, GQA): strip, lower-case, remove every ASCII punctuation character, then compare;
  LLaVA's GQA conversion instead only strips trailing full stops and lower-cases (`normalize_llava_gqa`).
* POPE, LLaVA (`llava/eval/eval_pope.py`): keep the text before the first ".", drop commas, split at spaces;
  "No", "no" or "not" among the words means no, anything else yes. lmms-eval: the lower-cased, stripped answer
  must be exactly "yes" or "no", anything else is "other" (wrong, and left out of precision and recall).
  Positive = yes. precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R),
  yes ratio = the share of *predicted* yes (LLaVA's statistic; lmms-eval's `pope_yes_ratio` is the share of
  ground-truth yes, 0.5 by construction).
* MME: an answer is yes / no when, lower-cased, stripped and without ".", it is "yes" / "no" (or "y" / "n"),
  else when "yes" / "no" occurs in its first 4 characters, else "other". Per category, acc = share of correct
  questions and acc+ = share of images whose questions are all correct; score = 100 acc + 100 acc+. Perception
  sums 10 categories (at most 2000), cognition 4 (at most 800).
* REC: IoU in the normalised frame of the original image; ACC@t = IoU >= t; centre accuracy = the predicted
  centre inside the true box.

Intervals: a 95% percentile bootstrap over items (or over clusters of items, e.g. the two questions of an MME
image), seeded, so a report is reproducible; the paired bootstrap resamples the same items for both configs and
gives the interval of the difference."""

from __future__ import annotations

import string
from typing import Callable, Sequence

import numpy as np

_PUNCT = str.maketrans("", "", string.punctuation)
BOOTSTRAP_SAMPLES = 1000
IOU_TOLERANCE = 1e-9  # boxes converted between frames in floating point: IoU 0.5 stays 0.5


# ---- answers -----------------------------------------------------------------------------------------------
def normalize_exact(text: str) -> str:
    """lmms-eval's exact-match normalisation: stripped, lower-cased, ASCII punctuation removed."""
    return text.strip().lower().translate(_PUNCT).strip()


def normalize_llava_gqa(text: str) -> str:
    """LLaVA's GQA conversion: trailing full stops removed, lower-cased."""
    return text.strip().rstrip(".").lower()


def exact_match(prediction: str, answers: Sequence[str], normalize: Callable[[str], str] = normalize_exact) -> bool:
    """The normalised prediction equals one of the normalised reference answers."""
    pred = normalize(prediction)
    return any(pred == normalize(a) for a in answers)


def pope_label_llava(text: str) -> str:
    """"yes" or "no" by LLaVA's POPE rule (see the module docstring)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def pope_label_lmms(text: str) -> str:
    """"yes", "no" or "other" by lmms-eval's POPE rule: the whole answer must be the word."""
    t = text.lower().strip()
    return t if t in ("yes", "no") else "other"


def mme_label(text: str) -> str:
    """"yes", "no" or "other" by MME's answer parser (see the module docstring)."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    return "yes" if "yes" in head else ("no" if "no" in head else "other")


# ---- aggregates --------------------------------------------------------------------------------------------
def pope_metrics(predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 and yes_ratio (share of predicted yes) of POPE labels."""
    pred = np.asarray(predicted)
    gold = np.asarray(labels)
    n = len(gold)
    tp = int(((pred == "yes") & (gold == "yes")).sum())
    fp = int(((pred == "yes") & (gold == "no")).sum())
    fn = int(((pred == "no") & (gold == "yes")).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((pred == gold).mean()) if n else 0.0,
        "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": float((pred == "yes").mean()) if n else 0.0,
    }


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows: Sequence[tuple[str, str, bool]]) -> dict[str, float]:
    """MME from (category, image, correct) rows: `<category>` = 100 acc + 100 acc+ of each category present,
    `perception` and `cognition` their sums over the categories of each group."""
    by_cat: dict[str, dict[str, list[bool]]] = {}
    for cat, image, ok in rows:
        by_cat.setdefault(cat, {}).setdefault(image, []).append(bool(ok))
    out: dict[str, float] = {}
    for cat, images in by_cat.items():
        answers = [a for v in images.values() for a in v]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        out[cat] = 100 * acc + 100 * acc_plus
    out["perception"] = sum(out.get(c, 0.0) for c in MME_PERCEPTION)
    out["cognition"] = sum(out.get(c, 0.0) for c in MME_COGNITION)
    return out


def rec_metrics(ious: Sequence[float], centers: Sequence[bool],
                thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> dict[str, float]:
    """Mean IoU, ACC@t for each threshold and centre accuracy."""
    iou = np.asarray(ious, dtype=float)
    out = {"iou": float(iou.mean()) if len(iou) else 0.0}
    for t in thresholds:
        out[f"acc@{t}"] = float((iou >= t - IOU_TOLERANCE).mean()) if len(iou) else 0.0
    out["center_acc"] = float(np.mean(centers)) if len(centers) else 0.0
    return out


# ---- intervals ---------------------------------------------------------------------------------------------
def _resample(n: int, clusters: Sequence | None, samples: int, seed: int) -> list[np.ndarray]:
    """Index arrays of `samples` bootstrap resamples of n items (whole clusters when given)."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        return list(rng.integers(0, n, size=(samples, n)))
    groups: dict = {}
    for i, c in enumerate(clusters):
        groups.setdefault(c, []).append(i)
    members = [np.asarray(v) for v in groups.values()]
    picks = rng.integers(0, len(members), size=(samples, len(members)))
    return [np.concatenate([members[j] for j in row]) for row in picks]


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] | None = None,
                 clusters: Sequence | None = None, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: the mean) over items.

    `values` is a sequence of per-item values (an array of rows for a statistic that reads several fields);
    `clusters` resamples whole groups of items together."""
    arr = np.asarray(values, dtype=object if statistic is not None else float)
    n = len(arr)
    if n == 0:
        return float("nan"), float("nan")
    if statistic is None and clusters is None:
        idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
        stats = arr.astype(float)[idx].mean(1)
    else:
        stat = statistic or (lambda a: float(np.mean(a.astype(float))))
        stats = np.array([stat(arr[idx]) for idx in _resample(n, clusters, samples, seed)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], clusters: Sequence | None = None,
                          samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the difference of two configs' per-item values on the same items, with
    the percentile interval of a bootstrap that resamples the same items for both."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same items: {len(x)} vs {len(y)}")
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    d = x - y
    lo, hi = bootstrap_ci(d, clusters=clusters, samples=samples, seed=seed, level=level)
    return float(d.mean()), lo, hi


def visual_gain_retained(acc: float, acc_unrouted: float, acc_blind: float) -> float:
    """(acc - acc_blind) / (acc_unrouted - acc_blind); NaN when the unrouted model gains nothing from the image."""
    gain = acc_unrouted - acc_blind
    return (acc - acc_blind) / gain if abs(gain) > 1e-12 else float("nan")

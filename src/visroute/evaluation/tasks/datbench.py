"""`datbench`: DatBench rows (`id, image, question, prompt_format{prefix, suffix}, answer, all_answers,
source_info{dataset, ...}, metadata` as a JSON string). The prompt is prefix + question + suffix.

Scoring: DatBench's own scorer for the row's source dataset when the `datbench` package is importable (a
score >= 0.5 is correct, as DatBench counts it), with box answers first converted from the model's answer frame
to normalised coordinates. Without it, rules for the capabilities that allow them: grounding (`metadata.bbox`,
normalised x1 y1 x2 y2: IoU >= 0.5), counting (the last integer of the answer equals the true count), multiple
choice (`metadata.options` or `all_choices`: the first option letter in the answer), and short answers (exact
match against any of `all_answers`). Rows needing an LLM judge are scored by the same rules (DatBench's
`compute_metrics` does so too)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from visroute.evaluation import metrics as M
from visroute.evaluation.tasks import register_task
from visroute.evaluation.tasks.base import Task, TaskItem, plain_rows, read_table, row_images

COLUMNS = ("id", "image", "question", "prompt_format", "answer", "all_answers", "source_info", "metadata")
COUNTING = ("countbench", "tallyqa")


def capability_of(dataset: str, meta: dict[str, Any]) -> str:
    name = dataset.lower()
    if "bbox" in meta or name.startswith("refcoco"):
        return "grounding"
    if any(name.startswith(c) for c in COUNTING):
        return "counting"
    if meta.get("options") or meta.get("all_choices"):
        return "choice"
    return "short"


def _choice_letter(text: str) -> str | None:
    m = re.search(r"\b([A-J])\b", text.strip())
    return m.group(1) if m else None


def _last_int(text: str) -> int | None:
    nums = re.findall(r"-?\d+", text)
    return int(nums[-1]) if nums else None


def _datbench_scorer(dataset: str):
    try:
        from datbench.datasets_scoring import DATASET_SCORING_MODULES  # optional: not on PyPI
    except ImportError:
        return None
    return DATASET_SCORING_MODULES.get(dataset)


@register_task
class DatbenchTask(Task):
    name = "datbench"
    description = "DatBench rows: rule-based scoring of grounding, counting, multiple choice and short answers"
    instruction = ""  # the rows carry their own prompt_format
    max_new_tokens = 32
    options = {"split": (None, "the split of a datasets folder"),
               "own_scorers": (True, "use DatBench's scorers when the datbench package is importable")}

    def load(self, limit: int | None) -> list[TaskItem]:
        path = self.path()
        ds = read_table(path, self.name, COLUMNS, self.opts["split"])
        out = []
        for i, r in enumerate(plain_rows(ds)[:limit]):
            meta = r["metadata"]
            meta = json.loads(meta) if isinstance(meta, str) and meta.strip() else (meta or {})
            dataset = str((r["source_info"] or {}).get("dataset", ""))
            cap = capability_of(dataset, meta)
            fmt = r["prompt_format"] or {}
            answers = [str(a) for a in (r["all_answers"] or [])] or [str(r["answer"])]
            box = [float(v) for v in meta["bbox"]] if cap == "grounding" and "bbox" in meta else None
            out.append(TaskItem(
                id=str(r["id"]), question=f"{fmt.get('prefix', '')}{r['question']}{fmt.get('suffix', '')}",
                answers=answers, kind={"grounding": "box", "counting": "count"}.get(cap, cap), box=box,
                meta={"dataset": dataset, "capability": cap, "answer": str(r["answer"]), "metadata": meta},
                images=row_images(ds, i, "image", path.parent)))
        return out

    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        cap = item.meta["capability"]
        out: dict[str, Any] = {"capability": cap, "dataset": item.meta["dataset"]}
        if cap == "grounding":
            out.update(self.score_box(item, prediction, frame))
        scorer = _datbench_scorer(item.meta["dataset"]) if self.opts["own_scorers"] else None
        if scorer is not None:
            text = prediction
            if cap == "grounding":  # give DatBench the box in its own frame: normalised [x1, y1, x2, y2]
                # fixed decimals: its parser reads plain numbers, not exponents
                text = "[" + ", ".join(f"{v:.6f}" for v in (out["box"] or [0, 0, 0, 0])) + "]"
            sample = {**item.meta["metadata"], "answer": item.meta["answer"], "all_answers": item.answers}
            score = float(scorer.score_sample(sample, text)["score"])
            out.update({"correct": score >= 0.5, "score": score, "scorer": "datbench"})
            return out
        if cap == "counting":
            out["correct"] = _last_int(prediction) == _last_int(item.meta["answer"])
        elif cap == "choice":
            truth = _choice_letter(item.meta["answer"])
            out["correct"] = truth is not None and _choice_letter(prediction) == truth
        elif cap == "short":
            out["correct"] = M.exact_match(prediction, item.answers)
        return out

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        for cap in sorted({r["capability"] for r in rows}):
            out[f"accuracy_{cap}"] = float(np.mean([r["correct"] for r in rows if r["capability"] == cap]))
        return out

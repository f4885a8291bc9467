"""The Reroute paper's table through lmms-eval: per tier, FastV (K=3) and PyramidDrop (early, from layer 2)
pruning and Reroute matched to each, as visroute configs solved exactly to the tier (integer keeps for the
model shape's visual tokens; `visroute.budget.preset`, the Reroute reference code's convention), run on the
paper's lmms-eval tasks next to the unrouted model and the blind control, and gathered into one Markdown table.

Each (row, task) run writes `OUT/<model>/<row>/<task>.json`; a rerun skips what is there (resumable). The model
loads once; rows switch its routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # an annotation only: `visroute paper-table --help` reads this module without importing torch
    from visroute.config import RoutingConfig

from visroute.names import TIERS  # noqa: F401  (the papers' tiers, re-exported)

VARIANTS = (
    ("fastv", "FastV K=3 (prune)"),
    ("pdrop", "PDrop early-L2 (prune)"),
    ("reroute-fastv", "Reroute vs FastV"),
    ("reroute-pdrop", "Reroute vs PDrop"),
)
TASKS = (
    "pope", "gqa", "mme", "mmbench_en_dev_static",
    "refcoco_bbox_rec_val", "refcoco_bbox_rec_testA", "refcoco_bbox_rec_testB",
    "refcoco+_bbox_rec_val", "refcoco+_bbox_rec_testA", "refcoco+_bbox_rec_testB",
    "refcocog_bbox_rec_val", "refcocog_bbox_rec_test",
)
# the metric each task's column shows (lmms-eval's key, without the ",none" filter suffix)
HEADLINE = {"pope": "pope_f1_score", "gqa": "exact_match", "mme": "mme_perception_score",
            "mmbench_en_dev_static": "gpt_eval_score"}
REC_METRIC = "refcoco_ACC@0.5"


@dataclass(frozen=True)
class PaperModel:
    """A checkpoint of the paper's table: its Hugging Face id, the bench shape its presets are solved for, and
    the extra model_args the paper runs it with."""

    pretrained: str
    shape: str
    model_args: dict[str, Any] = field(default_factory=dict)


MODELS = {
    "llava-1.5": PaperModel("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b"),
    # the paper's Qwen runs cap images at 576 visual tokens (max_pixels = 576 x 28 x 28)
    "qwen2.5-vl": PaperModel("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b", {"max_pixels": 451584}),
}


@dataclass(frozen=True)
class Row:
    """One row of the table: a label, its routing (None: unrouted) and whether it is the blind control."""

    label: str
    config: RoutingConfig | None = None
    blind: bool = False
    tier: int | None = None

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("=", "")


def paper_configs(model: str, tiers: tuple[int, ...] = TIERS) -> list[Row]:
    """The table's rows for `model` ("llava-1.5" or "qwen2.5-vl"): unrouted, blind, then every variant at every
    tier, solved for the model shape's decoder depth and visual tokens (576 for both)."""
    from visroute.bench import model_config
    from visroute.budget import preset
    from visroute.families import families, get_shape

    if model not in MODELS:
        raise ValueError(f"Unknown paper model {model!r}; choose one of {', '.join(MODELS)}")
    shape = get_shape(MODELS[model].shape)
    family = families()[shape.family]
    visual = family.visual_tokens(model_config(shape.name)) or 576  # Qwen: the 576 tokens of the cap
    rows = [Row("unrouted"), Row("blind control", blind=True)]
    for tier in tiers:
        for name, label in VARIANTS:
            cfg = preset(name, tier, shape.name, num_visual=visual, num_layers=shape.num_layers)
            rows.append(Row(f"{label} @{tier}", cfg, tier=tier))
    return rows


def run_path(out: Path, model: str, row: Row, task: str) -> Path:
    return Path(out) / model / row.slug / f"{task}.json"


def plan(model: str, tiers: tuple[int, ...], tasks: tuple[str, ...], out: Path) -> list[tuple[Row, str, Path, bool]]:
    """Every (row, task) run with its result file and whether it is already done."""
    return [(row, task, run_path(out, model, row, task), run_path(out, model, row, task).exists())
            for row in paper_configs(model, tiers) for task in tasks]


def _model_args_text(model: PaperModel, pretrained: str | None, extra: dict[str, Any]) -> str:
    args = {"pretrained": pretrained or model.pretrained, **model.model_args, **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


def run_table(model: str, tiers: tuple[int, ...] = TIERS, tasks: tuple[str, ...] = TASKS, out: str | Path = "paper_table",
              pretrained: str | None = None, include_path: str | None = None, limit: int | None = None,
              batch_size: int = 1, dtype: str = "bfloat16", device_map: str | None = "auto",
              progress=print) -> Path:
    """Run what `plan` says is missing, then write OUT/<model>/table.md; returns its path."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from visroute.integrations.lmms.model import VisrouteLMM

    out = Path(out)
    todo = [(row, task, path) for row, task, path, done in plan(model, tiers, tasks, out) if not done]
    if todo:
        spec = MODELS[model]
        side_log = out / model / "side_logs"
        lm = VisrouteLMM(pretrained=pretrained or spec.pretrained, dtype=dtype, device_map=device_map,
                         batch_size=batch_size, side_log=str(side_log), **spec.model_args)
        manager = TaskManager(include_path=include_path, model_name="visroute")
        for row, task, path in todo:
            progress(f"{row.label} / {task}")
            lm.set_routing(row.config, blind=row.blind, side_log=side_log / row.slug)
            res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0,
                                  log_samples=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"row": row.label, "task": task, "config": None if row.config is None
                                       else row.config.to_dict(), "results": res["results"].get(task, {})},
                                      indent=1, default=str))
            tmp.replace(path)  # a run killed mid-write leaves no file that looks complete
    return write_table(model, tiers, tasks, out)


def _avg_T(side_log: Path) -> float | None:
    values = []
    for path in sorted(side_log.glob("side_log.*.jsonl")) if side_log.exists() else []:
        values += [json.loads(line)["avg_T"] for line in path.read_text().splitlines() if line.strip()]
    return sum(values) / len(values) if values else None


def _headline(task: str, results: dict[str, Any]) -> float | None:
    key = REC_METRIC if "bbox_rec" in task else HEADLINE.get(task)
    value = results.get(f"{key},none", results.get(key)) if key else None
    return float(value) if isinstance(value, (int, float)) else None


def write_table(model: str, tiers: tuple[int, ...], tasks: tuple[str, ...], out: str | Path) -> Path:
    """OUT/<model>/table.md from the runs done so far (a run not done shows as "-")."""
    out = Path(out)
    lines = [f"# The Reroute paper's table on {model} ({MODELS[model].pretrained}) through lmms-eval", "",
             "Columns: " + ", ".join(f"{t} ({REC_METRIC if 'bbox_rec' in t else HEADLINE.get(t, '?')})" for t in tasks)
             + "; avg_T measured from the side logs.", "",
             "| row | avg_T | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for row in paper_configs(model, tiers):
        cells = []
        for task in tasks:
            path = run_path(out, model, row, task)
            value = _headline(task, json.loads(path.read_text())["results"]) if path.exists() else None
            cells.append("-" if value is None else f"{value:.3f}")
        avg = _avg_T(out / model / "side_logs" / row.slug)
        lines.append(f"| {row.label} | {'-' if avg is None else f'{avg:.1f}'} | " + " | ".join(cells) + " |")
    path = out / model / "table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path

"""Per-run summaries of a results database (`summarize`, `RunSummary`) and the helpers every report section
shares (number formatting, plot set-up): the lowest layer of the reports, so that `report`, `study`, `pooled`
and `reroute_study` import it and none of them imports another's report."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from visroute.evaluation import metrics as M
from visroute.evaluation.grid import keep_name
from visroute.evaluation.store import Row, Run, Store


CONTROLS = ("random", "uniform", "oracle", "pool")


@dataclass
class RunSummary:
    run: Run
    rows: dict[str, Row]
    accuracy: float
    ci: tuple[float, float]
    vision_required: float | None = None
    gain_retained: float | None = None
    task_metrics: dict[str, float] = field(default_factory=dict)
    avg_T: float | None = None
    flops: float | None = None
    kv: float | None = None
    seconds: float | None = None

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def config(self) -> dict[str, Any] | None:
        return self.run.config

    def single_stage(self) -> tuple[str, str, int, str] | None:
        """(action, scorer, layer, budget) of a one-stage config."""
        cfg = self.config
        if not cfg or len(cfg["stages"]) != 1:
            return None
        parts = self.run.name.split("/")
        if len(parts) == 4 and parts[1] != cfg["scorer"]:
            return None  # a further seed of a seeded scorer (a sweep's `seeds`): single-seed analyses read seed 0
        return cfg["action"], cfg["scorer"], int(cfg["stages"][0]["layer"]), budget_label(self.run)

    def recall(self) -> list[list[float | None]] | None:
        """Per stage, per hop: mean retention recall over the items that carry relevance."""
        vals = [r.recall for r in self.rows.values() if r.recall]
        if not vals:
            return None
        out = []
        for s in range(len(vals[0])):
            hops = []
            for h in range(max(len(v[s]) for v in vals)):  # items of one-hop and two-hop families mix
                x = [v[s][h] for v in vals if len(v[s]) > h and v[s][h] is not None]
                hops.append(float(np.mean(x)) if x else None)
            out.append(hops)
        return out


def budget_label(run: Run) -> str:
    """The budget of a config: the budget part of a sweep config's name (k0.25, T0.11), else k<keep> when all
    its stages keep the same, else the keeps."""
    parts = run.name.split("/")
    if len(parts) == 4 and parts[3][:1] in ("k", "T"):
        return parts[3]
    keeps = [s["keep"] for s in (run.config or {}).get("stages", [])]
    if keeps and all(k == keeps[0] for k in keeps):
        return f"k{keep_name(keeps[0])}"
    return "keeps " + ",".join(str(k) for k in keeps)


def budget_order(label: str):
    """Budgets in numeric order (k0.0556 < k0.111 < k0.25; counts after shares)."""
    try:
        return (0, float(label[1:]))
    except ValueError:
        return (1, 0.0)


def task_for(run: Run):
    """The task a run ran, rebuilt from its stored spec without data (for its scoring and families)."""
    from visroute.evaluation.tasks import build_task

    spec = run.task_spec
    return build_task(spec["task"], data=None, **spec.get("options", {}))


def summarize(store: Store, seed: int = 0, samples: int = M.BOOTSTRAP_SAMPLES,
              keep: "Callable[[Row], bool] | None" = None) -> dict[str, list[RunSummary]]:
    """Per task label, the summary of every run (unrouted and blind first), over the items whose rows `keep`
    accepts (all by default; e.g. one question family of the testbed)."""
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in store.runs():
        by_task[run.task].append(run)
    out: dict[str, list[RunSummary]] = {}
    for label, runs in by_task.items():
        task = task_for(runs[0])
        rows = {r.run_id: {x.item_id: x for x in store.rows(r.run_id) if keep is None or keep(x)} for r in runs}
        base = next((r for r in runs if r.kind == "unrouted"), None)
        blind = next((r for r in runs if r.kind == "blind"), None)
        base_rows = rows[base.run_id] if base else {}
        blind_rows = rows[blind.run_id] if blind else {}
        summaries = []
        for run in sorted(runs, key=lambda r: ({"unrouted": 0, "blind": 1}.get(r.kind, 2), r.run_id)):
            rr = rows[run.run_id]
            if not rr:
                continue
            ids = sorted(rr)
            correct = [float(rr[i].correct) for i in ids]
            clusters = [rr[i].metrics.get(task.cluster_key) for i in ids] if task.cluster_key else None
            s = RunSummary(run, rr, float(np.mean(correct)),
                           M.bootstrap_ci(correct, clusters=clusters, samples=samples, seed=seed))
            s.task_metrics = task.aggregate([rr[i].metrics for i in ids])
            needs_vision = [i for i in ids if i in blind_rows and not blind_rows[i].correct]
            if needs_vision:
                s.vision_required = float(np.mean([rr[i].correct for i in needs_vision]))
            common = [i for i in ids if i in base_rows and i in blind_rows]
            if common:
                acc = np.mean([rr[i].correct for i in common])
                acc_base = np.mean([base_rows[i].correct for i in common])
                acc_blind = np.mean([blind_rows[i].correct for i in common])
                s.gain_retained = M.visual_gain_retained(acc, acc_base, acc_blind)
            s.avg_T = _mean([rr[i].avg_T for i in ids])
            s.flops = _ratio([rr[i].flops for i in ids], [rr[i].flops_unrouted for i in ids])
            s.kv = _ratio([rr[i].kv_entries for i in ids], [rr[i].kv_unrouted for i in ids])
            s.seconds = _mean([rr[i].seconds for i in ids])
            summaries.append(s)
        out[label] = summaries
    return out


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _ratio(num, den) -> float | None:
    pairs = [(a, b) for a, b in zip(num, den) if a is not None and b]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs else None


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (reports run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_legend(fig, axes) -> None:
    """One legend for all panels, right of them (each label once)."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` (PNG, tight) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def draw_references(ax, summaries: list[RunSummary]) -> None:
    """The unrouted model's and the blind control's accuracy as horizontal lines."""
    for s in summaries:
        if s.run.kind == "unrouted":
            ax.axhline(s.accuracy, color="black", lw=1.2, label="unrouted")
        elif s.run.kind == "blind":
            ax.axhline(s.accuracy, color="grey", lw=1.2, ls=":", label="blind")


def plot_scorer_lines(ax, lines: dict[str, dict[int, float]]) -> None:
    """One line per scorer over the stage layers; the controls dashed."""
    for scorer, by in sorted(lines.items()):
        x = sorted(by)
        # controls dashed with an open square: a control measured at one layer is a point, never nothing
        style = dict(ls="--", lw=1.6, marker="s", ms=5, mfc="none") if scorer in CONTROLS else \
            dict(ls="-", lw=1.2, marker="o", ms=3)
        ax.plot(x, [by[l] for l in x], label=scorer, **style)
    integer_ticks(ax)


def integer_ticks(ax) -> None:
    """Stage layers are integers: no 2.85 .. 3.15 ticks around a single layer."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def format_value(v: float | None, fmt: str = ".3f") -> str:
    """`v` formatted with `fmt`, "-" where it is missing or NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

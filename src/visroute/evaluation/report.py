"""Reports from a results database: `report.md` and PNG plots.

Per task:
* a table of every run: accuracy with its 95% interval, vision-required accuracy (accuracy on the items the
  blind control gets wrong), visual gain retained = (acc - acc(blind)) / (acc(unrouted) - acc(blind)), the
  task's own metrics, avg_T, prefill FLOPs and K/V entries relative to the unrouted prompt, seconds per item;
* accuracy against the stage layer of single-stage configs, one line per scorer and one panel per budget, with
  the unrouted model and the blind control as reference lines and the random and oracle controls dashed;
* accuracy against avg_T with the Pareto front (the best accuracy at or below each avg_T);
* retention recall against the stage layer (per hop where items have several);
* reroute - prune: paired differences of accuracy at equal avg_T (the same scorer and schedule), with
  paired-bootstrap intervals (exploratory).

Then, from `visroute.evaluation.pooled` on this model alone: the grid's declared primary contrasts (recorded in
the database by `study run`) with sign-flip p-values, Holm-corrected, every other comparison labelled
exploratory; the information horizon by the interval criterion of `statistics.horizon_by_interval` (the
upper end of the interval of best - random below delta, the best signal chosen on one half of the
vision-required items and measured on the other, random averaged over at least five seeds), overall and per
family; and chance-corrected accuracy per family with fixed (equal) family weights beside vision-required
accuracy. A study over several models (`models:` in the grid; `db` its index, `visroute.evaluation.layout`)
gives each model's sections in turn, then those statistics pooled over the models (hierarchical bootstrap,
models then items; each model's estimate beside the pooled one; a sign that differs across models flagged
model-specific).

Intervals use the bootstrap of `visroute.evaluation.metrics` (seeded); all accuracies are computed on the
items a run holds, and comparisons on the items both runs hold."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from visroute.evaluation import metrics as M
from visroute.evaluation.grid import Contrast
from visroute.evaluation.layout import databases, describe, is_index, primary_contrasts
from visroute.evaluation.pooled import figure_sections, pooled_sections
from visroute.evaluation.statistics import HORIZON_DELTA, loyalty
from visroute.evaluation.store import Run, Store
from visroute.evaluation.study import study_sections
from visroute.evaluation.summary import (
    CONTROLS,
    RunSummary,
    add_legend,
    budget_order,
    draw_references,
    format_value,
    integer_ticks,
    plot_scorer_lines,
    pyplot,
    save_figure,
    summarize,
    task_for,
)


# ---- comparisons -------------------------------------------------------------------------------------------
def reroute_vs_prune(summaries: list[RunSummary], seed: int = 0) -> list[dict[str, Any]]:
    """Pairs of runs that differ only in the action: reroute - prune accuracy on their common items, with the
    paired-bootstrap interval. Equal schedules give equal avg_T (reported for both). A one-stage pair is marked
    `identical` (no later stage for a token to re-enter) and not measured."""
    def key(s: RunSummary):
        c = s.config
        return (c["scorer"], str(c["stages"]), str(c.get("scorer_options"))) if c else None

    prune = {key(s): s for s in summaries if s.config and s.config["action"] == "prune"}
    out = []
    for s in summaries:
        if not s.config or s.config["action"] != "reroute" or key(s) not in prune:
            continue
        p = prune[key(s)]
        common = sorted(set(s.rows) & set(p.rows))
        if len(s.config["stages"]) == 1:  # nothing re-enters after the only stage: reroute is prune
            out.append({"reroute": s.name, "prune": p.name, "n": len(common), "identical": True,
                        "avg_T_reroute": s.avg_T, "avg_T_prune": p.avg_T})
            continue
        diff, lo, hi = M.paired_bootstrap_diff([s.rows[i].correct for i in common], [p.rows[i].correct for i in common],
                                               seed=seed)
        out.append({"reroute": s.name, "prune": p.name, "n": len(common), "diff": diff, "low": lo, "high": hi,
                    "avg_T_reroute": s.avg_T, "avg_T_prune": p.avg_T, "identical": False})
    return out


# ---- plots -------------------------------------------------------------------------------------------------


def plot_accuracy_vs_layer(summaries: list[RunSummary], path: Path, title: str) -> bool:
    groups: dict[str, dict[str, list[tuple[int, float, tuple]]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        st = s.single_stage()
        if st and st[0] == "prune":
            groups[st[3]][st[1]].append((st[2], s.accuracy, s.ci))
    if not groups:
        return False
    plt = pyplot()
    budgets = sorted(groups, key=budget_order)
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.8), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        draw_references(ax, summaries)
        plot_scorer_lines(ax, {scorer: {p[0]: p[1] for p in pts} for scorer, pts in groups[budget].items()})
        ax.set_title(f"{title}: prune, {budget}")
        ax.set_xlabel("stage layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with a lower-or-equal avg_T and a higher accuracy, by avg_T."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(summaries: list[RunSummary], path: Path, title: str) -> bool:
    pts = [(s.avg_T, s.accuracy, s) for s in summaries if s.avg_T is not None and s.run.kind != "blind"]
    if not pts:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_references(ax, summaries)
    groups = defaultdict(list)  # colour: the scorer; marker: the action (a method preset: its own group)
    for x, y, s in pts:
        cfg = s.config or {}
        groups[(cfg.get("scorer", s.name), cfg.get("action", s.run.kind))].append((x, y, s))
    markers = {"prune": "o", "reroute": "^", "unrouted": "*"}
    for (scorer, action), p in sorted(groups.items()):
        ax.scatter([a for a, _, _ in p], [b for _, b, _ in p], s=18, marker=markers.get(action, "D"),
                   label=f"{scorer}, {action}" if action != "unrouted" else "unrouted")
        for a, b, s in p:  # each point names its config and action
            label = s.name if s.run.kind != "routed" or action in s.name else f"{s.name} ({action})"
            ax.annotate(label, (a, b), fontsize=5, xytext=(3, 2), textcoords="offset points", alpha=0.8)
    front = pareto_front([(x, y) for x, y, _ in pts])
    ax.step([a for a, _ in front], [b for _, b in front], where="post", color="black", lw=0.8, alpha=0.6,
            label="Pareto front")
    ax.set_xlabel("avg_T (visual tokens per decoder layer)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: accuracy against avg_T")
    ax.grid(alpha=0.3)
    add_legend(fig, ax)
    save_figure(fig, path)
    return True


def plot_recall(summaries: list[RunSummary], path: Path, title: str) -> bool:
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    hops = 1
    for s in summaries:
        st, rec = s.single_stage(), s.recall()
        if st and st[0] == "prune" and rec:
            groups[st[3]][st[1]].append((st[2], rec[0]))
            hops = max(hops, len(rec[0]))
    if not groups:
        return False
    plt = pyplot()
    budgets = sorted(groups, key=budget_order)
    fig, axes = plt.subplots(hops, len(budgets), figsize=(4.6 * len(budgets), 3.4 * hops), squeeze=False,
                             sharey=True)
    for j, budget in enumerate(budgets):
        for h in range(hops):
            ax = axes[h][j]
            for scorer, pts in sorted(groups[budget].items()):
                pts = sorted((x, r[h]) for x, r in pts if len(r) > h and r[h] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=scorer,
                            ls="--" if scorer in CONTROLS else "-", marker="s" if scorer in CONTROLS else "o",
                            ms=5 if scorer in CONTROLS else 3, mfc="none" if scorer in CONTROLS else None)
            integer_ticks(ax)
            ax.set_title(f"{title}: {budget}" + (f", hop {h + 1}" if hops > 1 else ""))
            ax.set_xlabel("stage layer")
            ax.grid(alpha=0.3)
    for h in range(hops):
        axes[h][0].set_ylabel("retention recall" + (f", hop {h + 1}" if hops > 1 else ""))
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


def plot_differences(diffs: list[dict[str, Any]], path: Path, title: str) -> bool:
    diffs = [d for d in diffs if not d.get("identical")]
    if not diffs:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.35 * len(diffs)))
    y = np.arange(len(diffs))
    d = np.array([r["diff"] for r in diffs])
    err = np.array([[r["diff"] - r["low"] for r in diffs], [r["high"] - r["diff"] for r in diffs]])
    ax.errorbar(d, y, xerr=err, fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [r["reroute"].replace("reroute/", "") for r in diffs], fontsize=7)
    ax.set_xlabel("accuracy: reroute - prune (95% paired interval)")
    ax.set_title(f"{title}: reroute - prune at equal avg_T")
    save_figure(fig, path)
    return True


# ---- report.md ---------------------------------------------------------------------------------------------
def completeness(runs: list[Run], counts: dict[int, int], expected: dict[str, int], asked: dict[str, int],
                 skipped: dict[str, dict[str, str]]) -> list[str]:
    """The lines at the top of a report: runs that hold fewer rows than their task's items (partial), tasks
    without rows, and items skipped (never scored)."""
    lines = []
    short = [(r, counts.get(r.run_id, 0)) for r in runs if counts.get(r.run_id, 0) < expected.get(r.task, 0)]
    if short:
        lines += [f"**Partial:** {len(short)} of {len(runs)} runs hold fewer rows than their task's items; their "
                  f"numbers cover only the items they hold (resume with the same `visroute study run`):", ""]
        lines += [f"- {r.task} / {r.name}: {n} of {expected[r.task]}" for r, n in short] + [""]
    for task in sorted({r.task for r in runs}):
        if not any(counts.get(r.run_id, 0) for r in runs if r.task == task):
            lines += [f"**Task {task} has no rows.**", ""]
    for task, reasons in skipped.items():
        shown = list(reasons.items())[:10]
        lines += [f"**Skipped in {task}:** {len(reasons)} of {asked.get(task, '?')} items could not be run and are "
                  "never scored:", ""]
        lines += [f"- {item}: {reason}" for item, reason in shown]
        lines += ([f"- ... and {len(reasons) - len(shown)} more (`visroute study list`)"]
                  if len(reasons) > len(shown) else []) + [""]
    return lines


def _clipped(summaries: list[RunSummary]) -> list[str]:
    """Notes on runs where a stage asked for more tokens than an item had, so that stage kept all of them."""
    lines = []
    for s in summaries:
        n = sum(any((r.routing or {}).get("clipped") or []) for r in s.rows.values())
        if n:
            lines.append(f"Note: in {s.name}, a stage's keep exceeds the visual tokens of {n} of {len(s.rows)} "
                         f"items; that stage keeps them all.")
    return lines + [""] if lines else []


def _metric_format(name: str) -> str:
    """Scores (MME's perception, cognition) with one decimal, shares with three."""
    return ".1f" if name in ("perception", "cognition") else ".3f"


def _table(summaries: list[RunSummary], expected: int) -> list[str]:
    extra: list[str] = []
    for s in summaries:
        task = task_for(s.run)
        extra = [m for m in task.headline if any(m in x.task_metrics for x in summaries)] or extra
        break
    head = ["config", "n", "accuracy [95% CI]", "vision-req.", "gain ret.", "loyalty [95% CI]", *extra, "avg_T",
            "FLOPs", "K/V", "s/item"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = next((s for s in summaries if s.run.kind == "unrouted"), None)
    unrouted = {i: r.prediction for i, r in base.rows.items()} if base else {}
    for s in summaries:
        n = f"{len(s.rows)}" + ("" if len(s.rows) >= expected else f" of {expected}")
        loyal = loyalty({i: r.prediction for i, r in s.rows.items()}, unrouted) if s.run.kind == "routed" else None
        cells = [s.name, n, f"{s.accuracy:.3f} [{s.ci[0]:.3f}, {s.ci[1]:.3f}]", format_value(s.vision_required),
                 format_value(s.gain_retained), "-" if loyal is None or not loyal.n else
                 f"{loyal.value:.3f} [{loyal.low:.3f}, {loyal.high:.3f}]",
                 *[format_value(s.task_metrics.get(m), _metric_format(m)) for m in extra],
                 format_value(s.avg_T, ".1f"), format_value(s.flops, ".2f"), format_value(s.kv, ".2f"),
                 format_value(s.seconds, ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(db: str | Path, out: str | Path, seed: int = 0, delta: float = HORIZON_DELTA,
                 contrasts: "list[Contrast] | None" = None) -> Path:
    """Write `report.md` and the PNG plots of every task in database `db` (or of every model of the study whose
    index `db` is) into folder `out`; returns the report's path. `delta`: the information horizon's margin;
    `contrasts`: the primary contrasts to test (default: those recorded in `db` when its grid was run)."""

    store = Store(db)
    try:
        identity = store.identity
    finally:
        store.close()
    contrasts = primary_contrasts(db) if contrasts is None else contrasts
    out = Path(out)
    several = is_index(identity)
    models: dict[str, dict[str, list[RunSummary]]] = {}
    lines = [f"# Study report: {describe(identity)}", "",
             "Each model's sections, then the declared contrasts and the information horizon pooled over the models "
             "(last section).", ""] if several else []
    for label, path in databases(db).items():
        if not path.is_file():
            lines += [f"# Model `{label}`", "", f"Not run yet (no database {path.name}).", ""]
            continue
        body, summaries = model_sections(path, out, seed, delta, prefix=f"{label}_" if several else "")
        if not any(summaries.values()):
            lines += [f"# Model `{label}`", "", "No results yet.", ""] if several else []
            continue
        models[label] = summaries
        if several:  # each model's report one heading level down, under the model's name
            body = [f"# Model `{label}`", ""] + ["#" + line if line.startswith("#") else line for line in body]
        lines += body
    if not models:
        raise ValueError(f"{db} holds no results yet")
    lines += pooled_sections(models, contrasts, seed=seed, delta=delta, loyalty=len(models) > 1)
    if several:
        lines += figure_sections(models, out, contrasts, seed)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def model_sections(db: str | Path, out: Path, seed: int = 0, delta: float = HORIZON_DELTA,
                   prefix: str = "") -> tuple[list[str], dict[str, list[RunSummary]]]:
    """The Markdown of one model's database (its plots written into `out`, file names starting with `prefix`)
    and its runs' summaries per task."""
    store = Store(db)
    try:
        all_summaries = summarize(store, seed=seed)
        identity = store.identity
        expected_rows, skipped, counts = store.expected_rows(), store.skipped(), store.counts()
        runs, asked = store.runs(), store.items()
    finally:
        store.close()
    if not any(all_summaries.values()):
        return [], all_summaries
    out.mkdir(parents=True, exist_ok=True)
    model = identity.get("model", {})
    lines = [f"# Study report: grid `{identity.get('grid')}` (version {identity.get('version')})", "",
             f"Model `{model.get('path')}` ({model.get('dtype')}). accuracy: share correct, with a 95% bootstrap "
             "interval over items; vision-req.: accuracy on the items the blind control (the image removed) gets "
             "wrong; gain ret.: visual gain retained, (acc - acc(blind)) / (acc(unrouted) - acc(blind)); loyalty: "
             "share of answers equal to the unrouted model's (exact-match normalisation, Wilson interval); avg_T: "
             "visual tokens per decoder layer; FLOPs and K/V: decoder prefill FLOPs and cached K/V entries relative "
             "to the unrouted prompt; s/item: generation time per item. Comparisons between configs here are "
             "exploratory (no multiplicity control); the grid's declared primary contrasts are tested, "
             "Holm-corrected, in their own section.", ""]
    lines += completeness(runs, counts, expected_rows, asked, skipped)
    for label, summaries in all_summaries.items():
        safe = prefix + "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        lines += [f"## {label}", ""]
        if not summaries:
            lines += [f"No rows: no run of task {label} has stored a result yet (see the skipped items above, "
                      f"or rerun the sweep).", ""]
            continue
        expected = expected_rows.get(label) or max(len(s.rows) for s in summaries)
        lines += _clipped(summaries)
        blind = next((s for s in summaries if s.run.kind == "blind"), None)
        if blind:
            lines += [f"Blind-solvable: {sum(r.correct for r in blind.rows.values())} of {len(blind.rows)} items "
                      f"are answered right without the image.", ""]
        lines += _table(summaries, expected) + [""]
        for name, fn, caption in (("accuracy_vs_layer", plot_accuracy_vs_layer, "Accuracy against the stage layer"),
                                  ("pareto", plot_pareto, "Accuracy against avg_T"),
                                  ("recall_vs_layer", plot_recall, "Retention recall against the stage layer")):
            png = out / f"{safe}_{name}.png"
            if fn(summaries, png, label):
                lines += [f"{caption}:", "", f"![{caption}]({png.name})", ""]
        diffs = reroute_vs_prune(summaries, seed=seed)
        if diffs:
            lines += ["Reroute - prune at equal avg_T (paired bootstrap, 95%; exploratory):", "",
                      "| reroute | prune | n | difference [95% CI] | avg_T |", "|---|---|---|---|---|"]
            lines += [f"| {d['reroute']} | {d['prune']} | {d['n']} | "
                      + ("identical by definition (one stage: nothing re-enters)" if d["identical"] else
                         f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
                      + f" | {format_value(d['avg_T_reroute'], '.1f')} |" for d in diffs]
            png = out / f"{safe}_reroute_minus_prune.png"
            lines += [""]
            if plot_differences(diffs, png, label):
                lines += [f"![reroute - prune]({png.name})", ""]

    # items with a question family (the testbed): the study's analyses
    lines += study_sections(db, out, seed=seed, delta=delta, prefix=prefix)
    return lines, all_summaries

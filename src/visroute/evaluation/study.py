"""The study's analyses, over a results database whose items carry a question family (the testbed): where to
prune and with which signal, per group of families (one-hop, multi-hop, grounding); the information horizon per
family; the position bias of each signal; reroute against the pruning method it is matched to; how often a
token left out at one stage re-enters at the next, and whether it is the question's second hop; and what
changes when the items the model answers blind are left in. `visroute study report` appends these sections to
its report when a database holds such items.

Definitions (docs/DESIGN.md): vision-required accuracy is accuracy on the items the blind control gets wrong;
the information horizon is the first stage layer from which the upper end of the 95% interval of best - random
lies below delta at that layer and every deeper one (`statistics.horizon_by_interval`: the best signal, controls
excluded, chosen on one half of the vision-required items and measured on the other, random averaged over at
least five seeds); retention recall of a stage is the share of an item's relevant tokens active in it, per hop.
Every comparison here is exploratory; the grid's declared primary contrasts are tested in their own section."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from visroute.evaluation import metrics as M
from visroute.evaluation import reroute_study
from visroute.evaluation.pooled import horizon_table, horizon_text
from visroute.evaluation.summary import (
    CONTROLS,
    RunSummary,
    add_legend,
    budget_order,
    format_value,
    plot_scorer_lines,
    pyplot,
    save_figure,
    summarize,
)
from visroute.evaluation.statistics import HORIZON_DELTA
from visroute.evaluation.store import Row, Store


def family_groups() -> dict[str, tuple[str, ...]]:
    """The testbed's families in the groups the study reports on."""
    from visroute.testbed.questions import MULTI_HOP_FAMILIES, VISION_FAMILIES

    one_hop = tuple(f for f in VISION_FAMILIES if f not in MULTI_HOP_FAMILIES)
    groups = {"one-hop": one_hop, "multi-hop": tuple(MULTI_HOP_FAMILIES)}
    grounding = tuple(f for f in VISION_FAMILIES if f.endswith("grounding"))
    if grounding:
        groups["grounding"] = grounding
    return {name: fams for name, fams in groups.items() if fams}


def is_sweep_run(s: RunSummary) -> bool:
    """A config of a grid's sweep (named action/scorer/L<layer>/<budget>), not a listed one (e.g. a method)."""
    return len(s.name.split("/")) == 4


def _family(row: Row) -> str | None:
    return row.metrics.get("family")


def has_families(store: Store) -> bool:
    for run in store.runs():
        rows = store.rows(run.run_id)
        return bool(rows) and _family(rows[0]) is not None
    return False


# ---- where to prune ---------------------------------------------------------------------------------------
def prune_runs(summaries: list[RunSummary]) -> dict[str, dict[str, dict[int, RunSummary]]]:
    """budget -> scorer -> layer -> the single-stage prune run of the sweep."""
    out: dict[str, dict[str, dict[int, RunSummary]]] = defaultdict(lambda: defaultdict(dict))
    for s in summaries:
        st = s.single_stage() if is_sweep_run(s) else None
        if st and st[0] == "prune":
            out[st[3]][st[1]][st[2]] = s
    return out


def layer_table(summaries: list[RunSummary], value: str = "vision_required") -> dict[str, dict[str, dict[int, float]]]:
    """budget -> scorer -> layer -> value (accuracy or vision-required accuracy) of single-stage prune runs."""
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for budget, by_scorer in prune_runs(summaries).items():
        for scorer, by_layer in by_scorer.items():
            for layer, s in by_layer.items():
                if getattr(s, value) is not None:
                    out[budget][scorer][layer] = getattr(s, value)
    return out


def _markdown_layer_table(table: dict[str, dict[int, float]], best_marker: bool = True) -> list[str]:
    layers = sorted({l for by in table.values() for l in by})
    lines = ["| scorer | " + " | ".join(f"L{l}" for l in layers) + " |", "|---|" + "---|" * len(layers)]
    best = {l: max((by[l] for n, by in table.items() if n not in CONTROLS and l in by), default=None) for l in layers}
    for scorer in sorted(table, key=lambda n: (n in CONTROLS, n)):
        cells = []
        for l in layers:
            v = table[scorer].get(l)
            mark = "**" if best_marker and v is not None and scorer not in CONTROLS and v == best[l] else ""
            cells.append("-" if v is None else f"{mark}{v:.2f}{mark}")
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return lines


def plot_vision_required(summaries: list[RunSummary], path: Path, title: str) -> bool:
    """Vision-required accuracy against the stage layer, one line per scorer, a panel per budget."""
    table = layer_table(summaries)
    if not table:
        return False
    plt = pyplot()
    budgets = sorted(table, key=budget_order)
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.8), squeeze=False, sharey=True)
    base = next((s for s in summaries if s.run.kind == "unrouted"), None)
    for ax, budget in zip(axes[0], budgets):
        if base is not None and base.vision_required is not None:
            ax.axhline(base.vision_required, color="black", lw=1.2, label="unrouted")
        ax.axhline(0.0, color="grey", lw=1.0, ls=":", label="blind (0 by definition)")
        plot_scorer_lines(ax, table[budget])
        ax.set_title(f"{title}: {budget}")
        ax.set_xlabel("stage layer (prune from here on)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("vision-required accuracy")
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


def plot_recall_by_hop(summaries: list[RunSummary], path: Path, title: str) -> bool:
    """Retention recall of single-stage prune runs against the stage layer, per scorer, one panel per hop (at the
    tightest budget, where selection matters most)."""
    per: dict[str, dict[int, dict[str, dict[int, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for s in summaries:
        st, rec = (s.single_stage() if is_sweep_run(s) else None), s.recall()
        if st and st[0] == "prune" and rec:
            for h, v in enumerate(rec[0]):
                if v is not None:
                    per[st[3]][h][st[1]][st[2]] = v
    if not per:
        return False
    budget = sorted(per, key=budget_order)[0]
    hops = sorted(per[budget])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(hops), figsize=(4.6 * len(hops), 3.6), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], hops):
        plot_scorer_lines(ax, per[budget][h])
        ax.set_title(f"{title}: hop {h + 1}, {budget}")
        ax.set_xlabel("stage layer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("retention recall")
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


# ---- position bias -----------------------------------------------------------------------------------------
def position_bias(summaries: list[RunSummary]) -> dict[str, dict[str, np.ndarray]]:
    """Per scorer (single-stage prune runs at every layer and budget pooled): the share of each image row's and
    column's tokens that the stage selects (`rows`, `cols`), each relative to the overall selection rate (1 =
    no bias)."""
    counts: dict[str, dict[str, np.ndarray]] = {}
    for s in summaries:
        st = s.single_stage() if is_sweep_run(s) else None
        if not st or st[0] != "prune":
            continue
        for row in s.rows.values():
            routing = row.routing or {}
            grid = routing.get("grid")
            if not grid or not routing.get("selected"):
                continue
            r, c = grid
            acc = counts.setdefault(st[1], {"rows": np.zeros(r), "cols": np.zeros(c), "n": np.zeros(1)})
            if acc["rows"].shape[0] != r or acc["cols"].shape[0] != c:
                continue  # images of another grid size are not pooled
            picked = np.asarray([t for t in routing["selected"][0] if t < r * c], dtype=int)
            np.add.at(acc["rows"], picked // c, 1)
            np.add.at(acc["cols"], picked % c, 1)
            acc["n"] += 1
    out = {}
    for scorer, acc in counts.items():
        total = acc["rows"].sum()
        if total:
            out[scorer] = {"rows": acc["rows"] / total * len(acc["rows"]), "cols": acc["cols"] / total * len(acc["cols"])}
    return out


def plot_position_bias(bias: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> bool:
    if not bias:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False, sharey=True)
    for ax, key, label in ((axes[0][0], "rows", "image row (top to bottom)"), (axes[0][1], "cols", "image column")):
        for scorer, b in sorted(bias.items()):
            style = dict(ls="--", lw=1.4, marker="s", ms=4, mfc="none") if scorer in CONTROLS else \
                dict(ls="-", lw=1.2, marker="o", ms=3)
            ax.plot(range(len(b[key])), b[key], label=scorer, **style)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: selection rate by {key[:-1]}")
    axes[0][0].set_ylabel("selected / uniform")
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


def _bias_summary(b: dict[str, np.ndarray]) -> tuple[float, float]:
    """Selection share of the bottom third of the rows and of the right third of the columns, against 1/3."""
    r, c = b["rows"], b["cols"]
    return float(r[-(len(r) // 3):].sum() / r.sum()), float(c[-(len(c) // 3):].sum() / c.sum())


# ---- reroute against prune ----------------------------------------------------------------------------------
def matched_pairs(summaries: list[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """(reroute, base) pairs of method runs named `reroute-<method>@<tier>` and `<method>@<tier>`."""
    by_name = {s.name: s for s in summaries}
    return [(s, by_name[s.name[len("reroute-"):]]) for s in summaries
            if s.name.startswith("reroute-") and s.name[len("reroute-"):] in by_name]


def paired(a: RunSummary, b: RunSummary, keep=None, seed: int = 0) -> tuple[int, float, float, float]:
    """(n, a - b, low, high): accuracy difference on the items both hold (and `keep` accepts), paired bootstrap."""
    ids = sorted(i for i in set(a.rows) & set(b.rows) if keep is None or keep(a.rows[i]))
    if not ids:
        return 0, float("nan"), float("nan"), float("nan")
    d, lo, hi = M.paired_bootstrap_diff([a.rows[i].correct for i in ids], [b.rows[i].correct for i in ids], seed=seed)
    return len(ids), d, lo, hi


def reentry(summary: RunSummary) -> dict[str, float] | None:
    """Over a multi-stage run's items: of the visual tokens left out at a stage, the share active again at the
    next (`rate`); among the re-entering tokens of multi-hop items, the share that are hop-2 tokens (`hop2`),
    against the hop-2 share of all the tokens left out (`hop2_base`)."""
    left = back = 0
    hop2_back = hop2_left = back_multi = left_multi = 0
    for row in summary.rows.values():
        routing = row.routing or {}
        selected = routing.get("selected") or []
        if len(selected) < 2:
            continue
        grid = routing.get("grid")
        n = grid[0] * grid[1] if grid else max(max(s, default=-1) for s in selected) + 1
        relevant = routing.get("relevant") or []
        hop2 = set(relevant[1]) - set(relevant[0]) if len(relevant) > 1 else None
        for cur, nxt in zip(selected, selected[1:]):
            out_now = set(range(n)) - set(cur)
            again = out_now & set(nxt)
            left += len(out_now)
            back += len(again)
            if hop2 is not None:
                left_multi += len(out_now)
                back_multi += len(again)
                hop2_left += len(out_now & hop2)
                hop2_back += len(again & hop2)
    if not left:
        return None
    return {"rate": back / left, "hop2": hop2_back / back_multi if back_multi else float("nan"),
            "hop2_base": hop2_left / left_multi if left_multi else float("nan"), "reentered": float(back)}


def signal_differences(summaries: list[RunSummary], seed: int = 0) -> dict[str, dict[str, dict[str, tuple]]]:
    """budget -> half ("early": the first half of the stage layers, "late": the rest) -> scorer -> (n, d, low,
    high): vision-required accuracy of one prune stage with that scorer minus random's, per item averaged over
    the half's layers, with a paired bootstrap interval over the items the blind control gets wrong."""
    blind = next((s for s in summaries if s.run.kind == "blind"), None)
    if blind is None:
        return {}
    out: dict[str, dict[str, dict[str, tuple]]] = {}
    for budget, by_scorer in prune_runs(summaries).items():
        if "random" not in by_scorer:
            continue
        layers = sorted(by_scorer["random"])
        halves = {"early": layers[:len(layers) // 2], "late": layers[len(layers) // 2:]}
        out[budget] = {}
        for half, chosen in halves.items():
            def per_item(by_layer: dict[int, RunSummary], ids: list[str]) -> list[float]:
                return [float(np.mean([by_layer[l].rows[i].correct for l in chosen])) for i in ids]

            cells = {}
            for scorer, by_layer in by_scorer.items():
                if scorer == "random" or not all(l in by_layer for l in chosen) or not chosen:
                    continue
                ids = sorted(i for i, r in blind.rows.items() if not r.correct
                             and all(i in by_layer[l].rows and i in by_scorer["random"][l].rows for l in chosen))
                if ids:
                    d, lo, hi = M.paired_bootstrap_diff(per_item(by_layer, ids), per_item(by_scorer["random"], ids),
                                                        seed=seed)
                    cells[scorer] = (len(ids), d, lo, hi, chosen[0], chosen[-1])
            out[budget][half] = cells
    return out


# ---- the sections -------------------------------------------------------------------------------------------
def study_sections(db: str | Path, out: Path, seed: int = 0, delta: float = HORIZON_DELTA,
                   prefix: str = "") -> list[str]:
    """The study's Markdown sections (with their plots written into `out`, file names starting with `prefix`)
    for database `db`, or [] when its items carry no question family. `delta`: the information horizon's
    margin."""
    store = Store(db)
    try:
        if not has_families(store):
            return []
        groups = family_groups()
        everything = summarize(store, seed=seed)
        grouped = {g: summarize(store, seed=seed, keep=lambda r, fams=fams: _family(r) in fams)
                   for g, fams in groups.items()}
    finally:
        store.close()
    lines = ["# The study's analyses", ""]
    for label in everything:
        safe = prefix + "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        lines += _where_to_prune(label, safe, grouped, out, delta, seed)
        lines += _bias_section(label, safe, everything[label], out)
        for group, by_task in grouped.items():
            lines += _differences_section(f"{group} families ({label})", by_task.get(label, []), seed)
        lines += _reroute_section(label, grouped, everything[label], seed)
        lines += reroute_study.section(everything[label], family_groups(), _family, out, safe, seed)
        lines += _blind_section(label, everything[label], grouped)
    return lines


def _where_to_prune(label, safe, grouped, out, delta, seed) -> list[str]:
    lines = []
    for group, by_task in grouped.items():
        summaries = by_task.get(label, [])
        table = layer_table(summaries)
        if not table:
            continue
        horizons = horizon_table({"": by_task}, label, delta, seed)
        base = next((s for s in summaries if s.run.kind == "unrouted"), None)
        lines += [f"## Where to prune: {group} families ({label})", "",
                  f"Vision-required accuracy of one prune stage at each layer (the unrouted model: "
                  f"{format_value(base.vision_required if base else None, '.2f')}), the best signal in bold; the "
                  f"information horizon by the interval criterion (delta {delta:g}; see the section on it below):", ""]
        for budget in sorted(table, key=budget_order):
            lines += [f"Budget {budget}; information horizon: {horizon_text(horizons.get(budget, {}).get(''))}",
                      ""] + _markdown_layer_table(table[budget]) + [""]
        png = out / f"{safe}_{group}_vision_required_vs_layer.png"
        if plot_vision_required(summaries, png, group):
            lines += [f"![vision-required accuracy, {group}]({png.name})", ""]
        png = out / f"{safe}_{group}_recall_by_hop.png"
        if plot_recall_by_hop(summaries, png, group):
            lines += [f"![retention recall per hop, {group}]({png.name})", ""]
    return lines


def _bias_section(label, safe, summaries, out) -> list[str]:
    bias = position_bias(summaries)
    if not bias:
        return []
    png = out / f"{safe}_position_bias.png"
    plot_position_bias(bias, png, label)
    lines = ["## Position bias", "",
             "Selection rate of each image row and column relative to the overall rate (single-stage prune runs, "
             "every layer and budget pooled). A signal without position bias stays near 1; the bottom rows sit "
             "nearest the question in the sequence. Share of the selections in the bottom third of the rows and in "
             "the right third of the columns (1/3 = none):", "",
             "| scorer | bottom-third rows | right-third columns |", "|---|---|---|"]
    for scorer, b in sorted(bias.items()):
        rows, cols = _bias_summary(b)
        lines.append(f"| {scorer} | {rows:.3f} | {cols:.3f} |")
    return lines + ["", f"![position bias]({png.name})", ""]


def _differences_section(title: str, summaries: list[RunSummary], seed: int) -> list[str]:
    diffs = signal_differences(summaries, seed)
    if not diffs:
        return []
    lines = [f"## Each signal against random (exploratory): {title}", "",
             "Vision-required accuracy of one prune stage minus random's at the same layer and budget, per item "
             "averaged over the early (first half) or the late (second half) stage layers; paired bootstrap, 95%, "
             "over the items the blind control gets wrong. An interval that holds 0 is no measurable difference.", "",
             "| budget | scorer | early layers | late layers |", "|---|---|---|---|"]
    for budget in sorted(diffs, key=budget_order):
        halves = diffs[budget]
        scorers = sorted({s for cells in halves.values() for s in cells}, key=lambda n: (n in CONTROLS, n))
        for scorer in scorers:
            cells = []
            for half in ("early", "late"):
                c = halves.get(half, {}).get(scorer)
                cells.append("-" if c is None else f"{c[1]:+.3f} [{c[2]:+.3f}, {c[3]:+.3f}] (L{c[4]}-{c[5]}, n={c[0]})")
            lines.append(f"| {budget} | {scorer} | " + " | ".join(cells) + " |")
    return lines + [""]


def _reroute_section(label, grouped, summaries, seed) -> list[str]:
    pairs = matched_pairs(summaries)
    if not pairs:
        return []
    groups = family_groups()
    names = list(groups) + ["all"]
    lines = ["## Reroute against the pruning method it is matched to (exploratory)", "",
             "Accuracy difference reroute - base on the same items (paired bootstrap, 95%), by family group, with "
             "both configs' avg_T, prefill FLOPs and K/V entries relative to the unrouted prompt:", "",
             "| reroute | base | avg_T (r / b) | FLOPs (r / b) | K/V (r / b) | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for r, b in pairs:
        cells = []
        for g in names:
            keep = None if g == "all" else (lambda row, fams=groups[g]: _family(row) in fams)
            n, d, lo, hi = paired(r, b, keep, seed)
            cells.append("-" if not n else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n})")
        lines.append(f"| {r.name} | {b.name} | {format_value(r.avg_T, '.1f')} / {format_value(b.avg_T, '.1f')} | "
                     f"{format_value(r.flops, '.2f')} / {format_value(b.flops, '.2f')} | "
                     f"{format_value(r.kv, '.2f')} / {format_value(b.kv, '.2f')} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Re-entry: of the tokens a stage leaves out, the share active again at the next stage, and among "
              "those re-entering on multi-hop items the share that are hop-2 tokens (the object the answer is about), "
              "against the hop-2 share of everything left out:", "",
              "| run | re-entry rate | tokens re-entered | hop-2 share of re-entries | hop-2 share left out |",
              "|---|---|---|---|---|"]
    for s in summaries:
        stats = reentry(s) if s.config and s.config.get("action") == "reroute" else None
        if stats:
            lines.append(f"| {s.name} | {stats['rate']:.3f} | {int(stats['reentered'])} | "
                         f"{format_value(stats['hop2'])} | {format_value(stats['hop2_base'])} |")
    return lines + [""]


def _blind_section(label, summaries, grouped) -> list[str]:
    acc_all = layer_table(summaries, "accuracy")
    acc_vr = layer_table(summaries, "vision_required")
    if not acc_all:
        return []
    lines = ["## Leaving the blind-solvable items in", "",
             "Best signal minus random, on all items and on the vision-required items, per budget (mean over stage "
             "layers), and the signals' order by each (the DatBench argument: items a model answers without the "
             "image dilute the differences between signals):", "",
             "| budget | best - random, all items | best - random, vision-required | order, all items | "
             "order, vision-required |", "|---|---|---|---|---|"]
    for budget in sorted(acc_all, key=budget_order):
        def spread(table):
            layers = sorted({l for by in table.values() for l in by})
            gaps = []
            for l in layers:
                signals = [by[l] for n, by in table.items() if n not in CONTROLS and l in by]
                if signals and l in table.get("random", {}):
                    gaps.append(max(signals) - table["random"][l])
            return float(np.mean(gaps)) if gaps else None

        def order(table):
            means = {n: float(np.mean(list(by.values()))) for n, by in table.items() if n not in CONTROLS}
            return " > ".join(sorted(means, key=lambda n: -means[n])[:4])

        vr = acc_vr.get(budget, {})
        lines.append(f"| {budget} | {format_value(spread(acc_all[budget]))} | "
                     f"{format_value(spread(vr) if vr else None)} | "
                     f"{order(acc_all[budget])} | {order(vr) if vr else '-'} |")
    return lines + [""]

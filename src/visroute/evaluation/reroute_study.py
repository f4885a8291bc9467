"""Reroute against pruning, with the controls that isolate each effect: the report section of `study-reroute`.

A Reroute variant changes two things at once against the method it augments: its schedule (e.g. PDrop's geometric
keeps become [a, a, a/2, a/4]) and its action (prune becomes reroute). The runs of one method at one tier are
read as a 2 x 2 by their names (the `study-reroute` grid's convention):

    <m>@<t>                  base schedule, prune          <m>@<t>/reroute          base schedule, reroute
    reroute-<m>@<t>/prune    Reroute schedule, prune       reroute-<m>@<t>          Reroute schedule, reroute

and the contrasts are paired differences on the same items (bootstrap, 95%): the schedule (Reroute schedule -
base schedule, both pruned), the action (reroute - prune on the same schedule), and the net difference the papers
report (Reroute variant - base method). Two cells that run the same computation by definition are not measured as
a difference: a schedule under which no reroute stage has a bypassed token to choose (one stage; Nüwa's stage 2
among the stage-1 survivors) reroutes exactly as it prunes, and a pruned schedule whose later stages keep as many
tokens as the stage before them keeps the same tokens as without those stages. Next to the 2 x 2: the random
scorer under both actions on the Reroute schedule, the scoring conventions (`/previous`), the re-entry policies
(`/<policy>`) against pruning on the same schedule, and per decision the tokens evicted and re-admitted, the age
of the re-entrants and, where relevance is known, the relevant ones among them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visroute.config import RoutingConfig
from visroute.evaluation import metrics as M
from visroute.evaluation.grid import with_action
from visroute.evaluation.summary import RunSummary, format_value, pyplot, save_figure

NAME = re.compile(r"^(?P<variant>reroute-)?(?P<method>[a-z0-9]+(?:-layer0)?)@(?P<tier>[0-9.]+)(?:/(?P<rest>.+))?$")
CELLS = ("base/prune", "base/reroute", "reroute/prune", "reroute/reroute")
LARGE = 10**6  # visual tokens for the identity checks: int keeps are counts, fractions keep their order


def _effective_prune(cfg: RoutingConfig) -> list[tuple]:
    """A pruned schedule without the stages that keep at least as many tokens as the stage before them (they
    keep every candidate, whatever the scores): what it computes."""
    out, active = [], LARGE
    for s in cfg.stages:
        k = min(s.keep_count(LARGE), active)
        if k < active or not out and k < LARGE:
            d = s.to_dict()
            d.pop("action", None)
            out.append(tuple(sorted((key, repr(v)) for key, v in d.items())))
        active = k
    return out


def reroutes_as_it_prunes(cfg: RoutingConfig) -> bool:
    """True when no reroute stage of `cfg` ever has a bypassed token to choose (each chooses among exactly the
    tokens active before it), so that rerouting computes what pruning computes."""
    if cfg.reentry != "reference":
        return False
    active = alive = LARGE
    for i, s in enumerate(cfg.stages):
        action = cfg.action_of(s)
        if action == "reroute" and i > 0 and alive > active:
            return False
        active = min(s.keep_count(LARGE), active if action == "prune" else alive)
        if action == "prune":
            alive = active
    return True


def same_computation(a: RoutingConfig, b: RoutingConfig) -> bool:
    """True when two configs compute the same thing by definition (see the module docstring)."""
    if (a.scorer, a.scorer_options) != (b.scorer, b.scorer_options):
        return False
    if not all(reroutes_as_it_prunes(c) for c in (a, b)):
        return a.to_dict() == b.to_dict()
    return _effective_prune(with_action(a, "prune")) == _effective_prune(with_action(b, "prune"))


def identical_by_definition(a: RunSummary, b: RunSummary) -> bool:
    """Two runs whose configs compute the same thing by definition."""
    if not a.config or not b.config:
        return False
    return same_computation(RoutingConfig.from_dict(a.config), RoutingConfig.from_dict(b.config))


@dataclass
class Design:
    """The runs of one method at one tier, by role."""

    method: str
    tier: str
    cells: dict[str, RunSummary] = field(default_factory=dict)  # CELLS -> run
    others: dict[str, RunSummary] = field(default_factory=dict)  # "random", "random/prune", "previous", ...

    def cell(self, name: str) -> RunSummary | None:
        """A cell's run, or the run that computes the same by definition."""
        if name in self.cells:
            return self.cells[name]
        schedule, action = name.split("/")
        source = next((r for c, r in self.cells.items() if c.startswith(schedule + "/") and r.config), None)
        if source is None:
            return None
        target = with_action(RoutingConfig.from_dict(source.config), action)
        targets = [target]
        if action == "reroute":  # Nüwa + Reroute keeps its merge before the decoder a prune (reroute-nuwa)
            data = target.to_dict()
            data["stages"] = [{**st, "action": "prune"} if st.get("merge") else st for st in data["stages"]]
            targets.append(RoutingConfig.from_dict(data))
        return next((r for t in targets for r in self.cells.values()
                     if r.config and same_computation(RoutingConfig.from_dict(r.config), t)), None)


def designs(summaries: list[RunSummary]) -> list[Design]:
    """The 2 x 2 designs found among the runs, by method and tier, in name order."""
    found: dict[tuple[str, str], Design] = {}
    for s in summaries:
        m = NAME.match(s.name)
        if m is None:
            continue
        method, tier, rest = m["method"], m["tier"], m["rest"]
        if method.endswith("-layer0"):
            d = found.setdefault((method[:-len("-layer0")], tier), Design(method[:-len("-layer0")], tier))
            d.others["layer0" + (f"/{rest}" if rest else "")] = s
            continue
        d = found.setdefault((method, tier), Design(method, tier))
        schedule = "reroute" if m["variant"] else "base"
        if rest is None:
            d.cells[f"{schedule}/{'reroute' if schedule == 'reroute' else 'prune'}"] = s
        elif rest in ("prune", "reroute"):
            d.cells[f"{schedule}/{rest}"] = s
        elif schedule == "reroute":
            d.others[rest] = s
    return [d for d in found.values() if "base/prune" in d.cells and "reroute/reroute" in d.cells]


def contrast(a: RunSummary | None, b: RunSummary | None, keep=None, seed: int = 0) -> tuple | str | None:
    """(n, a - b, low, high) on the items both hold (and `keep` accepts); "identical" when the two runs compute the
    same by definition, "no item differs" when they answer every item alike; None when one is missing."""
    if a is None or b is None:
        return None
    if a is b or identical_by_definition(a, b):
        return "identical"
    ids = sorted(i for i in set(a.rows) & set(b.rows) if keep is None or keep(a.rows[i]))
    if not ids:
        return None
    x, y = [a.rows[i].correct for i in ids], [b.rows[i].correct for i in ids]
    if x == y:  # no item differs: the bootstrap interval would be a degenerate [0, 0]
        return "no item differs"
    d, lo, hi = M.paired_bootstrap_diff(x, y, seed=seed)
    return len(ids), d, lo, hi


def _cell_text(c) -> str:
    if c is None:
        return "-"
    if c == "identical":
        return "0 (identical by definition)"
    if c == "no item differs":
        return "0 (no item differs)"
    n, d, lo, hi = c
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def contrasts_of(d: Design, keep=None, seed: int = 0) -> dict[str, tuple | str | None]:
    """The named contrasts of one design (see the module docstring)."""
    bp, br, rp, rr = (d.cell(c) for c in CELLS)
    out = {
        "net (Reroute variant - base method)": contrast(rr, bp, keep, seed),
        "schedule (both pruned)": contrast(rp, bp, keep, seed),
        "action on the Reroute schedule": contrast(rr, rp, keep, seed),
        "action on the base schedule": contrast(br, bp, keep, seed),
        "random: reroute - prune (Reroute schedule)": contrast(d.others.get("random"), d.others.get("random/prune"),
                                                              keep, seed),
        "scoring at the decision layer - at l-1": contrast(rr, d.others.get("previous"), keep, seed),
        "routing from layer 0 - Nüwa's stage 1 pruned": contrast(d.others.get("layer0"), rr, keep, seed),
    }
    for name in sorted(k for k in d.others if k not in ("random", "random/prune", "previous")
                       and not k.startswith("layer0")):
        out[f"policy {name} - prune (same schedule)"] = contrast(d.others[name], rp, keep, seed)
        out[f"policy {name} - reference re-entry"] = contrast(d.others[name], rr, keep, seed)
    return {k: v for k, v in out.items() if v is not None}


def decision_stats(s: RunSummary) -> list[dict[str, float]] | None:
    """Per decision of a run, means over its items: tokens evicted and re-admitted, the age of the re-entrants
    (layers skipped, over re-entrants), and the relevant tokens evicted and re-admitted (over items with
    relevance); None when the run stored no decisions."""
    per_item = [r.routing.get("decisions") for r in s.rows.values() if r.routing and r.routing.get("decisions")]
    if not per_item:
        return None
    out = []
    for i in range(len(per_item[0])):
        ds = [p[i] for p in per_item if len(p) > i]
        ages = [a for d in ds for a in d["ages"]]
        rel = [d for d in ds if d["relevant_evicted"] is not None]
        out.append({"layer": ds[0]["layer"], "evicted": float(np.mean([d["evicted"] for d in ds])),
                    "readmitted": float(np.mean([d["readmitted"] for d in ds])),
                    "age": float(np.mean(ages)) if ages else float("nan"),
                    "relevant_evicted": float(np.mean([d["relevant_evicted"] for d in rel])) if rel else float("nan"),
                    "relevant_readmitted": float(np.mean([d["relevant_readmitted"] for d in rel])) if rel
                    else float("nan")})
    return out


def section(summaries: list[RunSummary], groups: dict[str, tuple[str, ...]], family_of, out: Path | None = None,
            safe: str = "", seed: int = 0) -> list[str]:
    """The Markdown section (and its plot, when `out` is given) for one task's runs; [] without a 2 x 2."""
    found = designs(summaries)
    if not found:
        return []
    lines = ["## Reroute against pruning: the 2 x 2 of schedule and action (exploratory)", "",
             "Accuracy of each cell (all items), then paired differences on the same items (bootstrap, 95%; * marks "
             "an interval without 0). Base = the method's own schedule; Reroute = the Reroute variant's schedule. A "
             "cell marked ≡ runs the same computation as the named one by definition (no bypassed token ever has "
             "a choice, or the later stages of a pruned schedule keep what they are given).", "",
             "| method | base, prune | base, reroute | Reroute, prune | Reroute, reroute |", "|---|---|---|---|---|"]
    for d in found:
        cells = []
        for c in CELLS:
            run = d.cell(c)
            if run is None:
                cells.append("-")
            elif c in d.cells:
                cells.append(f"{run.accuracy:.3f}")
            else:
                cells.append(f"≡ {run.name}")
        lines.append(f"| {d.method}@{d.tier} | " + " | ".join(cells) + " |")
    names = ["all", *groups]
    lines += ["", "Contrasts, all items and per family group:", "",
              "| method | contrast | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    table: dict[tuple[str, str], dict[str, object]] = {}
    for d in found:
        for g in names:
            keep = None if g == "all" else (lambda row, fams=groups[g]: family_of(row) in fams)
            for k, v in contrasts_of(d, keep, seed).items():
                table.setdefault((f"{d.method}@{d.tier}", k), {})[g] = v
    for (method, k), by_group in table.items():
        lines.append(f"| {method} | {k} | " + " | ".join(_cell_text(by_group.get(g)) for g in names) + " |")
    lines += ["", "Per decision (means per item): tokens evicted / re-admitted, the mean age of the re-entrants "
              "(layers they skipped), and relevant tokens evicted / re-admitted:", "",
              "| run | decisions: layer evicted/re-admitted (age) [relevant evicted/re-admitted] |", "|---|---|"]
    for s in summaries:
        m = NAME.match(s.name)
        if m is None or not s.config or "reroute" not in [s.config.get("action")] + [
                st.get("action") for st in s.config.get("stages", [])]:
            continue
        stats = decision_stats(s)
        if stats:
            parts = [f"L{x['layer']} {x['evicted']:.1f}/{x['readmitted']:.1f}"
                     + (f" ({x['age']:.1f})" if x["readmitted"] > 0 else "")
                     + (f" [{x['relevant_evicted']:.2f}/{x['relevant_readmitted']:.2f}]"
                        if not np.isnan(x["relevant_evicted"]) else "") for x in stats]
            lines.append(f"| {s.name} | " + " · ".join(parts) + " |")
    if out is not None:
        path = out / f"{safe}_reroute_contrasts.png"
        if plot_contrasts(found, path, seed):
            lines += ["", f"![Reroute contrasts]({path.name})"]
    return lines + [""]


PLOTTED = ("schedule (both pruned)", "action on the Reroute schedule", "net (Reroute variant - base method)",
           "random: reroute - prune (Reroute schedule)")


def plot_contrasts(found: list[Design], path: Path, seed: int = 0) -> bool:
    """One panel per method: the schedule, action and net contrasts and the random control (all items) per tier,
    with their 95% intervals; the re-entry policies against pruning on the same schedule as open markers."""
    plt = pyplot()
    methods = sorted({d.method for d in found})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False, sharey=True)
    drew = False
    for ax, method in zip(axes[0], methods):
        ds = [d for d in found if d.method == method]
        labels = []
        for x, d in enumerate(ds):
            labels.append(f"@{d.tier}")
            cs = contrasts_of(d, seed=seed)
            for j, name in enumerate(PLOTTED):
                c = cs.get(name)
                off = x + (j - 1.5) * 0.12
                if isinstance(c, str):  # identical by definition, or no item differs
                    ax.plot([off], [0], marker="x", color=f"C{j}", label=name)
                elif c is not None:
                    ax.errorbar([off], [c[1]], yerr=[[c[1] - c[2]], [c[3] - c[1]]], fmt="o", color=f"C{j}",
                                capsize=2, label=name)
                    drew = True
            for k, (name, c) in enumerate(p for p in cs.items() if p[0].endswith("- prune (same schedule)")):
                if isinstance(c, tuple):
                    policy = name.split(" ")[1]
                    ax.errorbar([x + 0.36 + 0.06 * k], [c[1]], yerr=[[c[1] - c[2]], [c[3] - c[1]]], fmt="o",
                                mfc="none", color=f"C{4 + k}", capsize=2, label=f"{policy} - prune (same schedule)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ds)), labels)
        ax.set_title(method)
        ax.set_ylabel("accuracy difference")
    if not drew:
        plt.close(fig)
        return False
    seen: dict[str, object] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2)
    save_figure(fig, path)
    return True


__all__ = ["CELLS", "Design", "contrast", "contrasts_of", "decision_stats", "designs", "identical_by_definition",
           "reroutes_as_it_prunes", "same_computation", "section"]

"""A report pooled across models: several results databases of one grid's configs, one per model (run the grid
with `visroute study run GRID --model M --db M.sqlite` for each), read together. For every task it gives

* loyalty: per config, the share of items whose answer equals the unrouted model's, per model (Wilson
  interval) and pooled (hierarchical bootstrap, models then items, crossed: items are matched by id across
  models);
* the grid's declared primary contrasts: a - b pooled with each model's own estimate, a paired sign-flip p-value
  and its Holm correction over all primary contrasts, and a "model-specific" flag when the models' estimates
  differ in sign; every other comparison in any report is exploratory;
* the information horizon per budget and model by the interval criterion of `statistics.horizon_by_interval`
  (random averaged over the sweep's seeds, the best signal chosen on one half of the vision-required items and
  measured on the other);
* on the testbed, chance-corrected accuracy per family with equal family weights (the blind-solvable family
  left out by its label) beside vision-required accuracy.

One database is a valid input (a single model: no pooling, the same statistics)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from visroute.evaluation import statistics as S
from visroute.evaluation.grid import Contrast
from visroute.evaluation.summary import (
    CONTROLS,
    RunSummary,
    add_legend,
    budget_order,
    format_value,
    integer_ticks,
    pyplot,
    save_figure,
    summarize,
)
from visroute.evaluation.store import Store
from visroute.methods import methods

ModelRuns = dict[str, dict[str, list[RunSummary]]]  # model -> task label -> its runs' summaries


def load(dbs: Sequence[str | Path], seed: int = 0, samples: int = 200) -> ModelRuns:
    """model label -> task -> runs, from results databases (a multi-model study's index stands for every model's
    database; a model is labelled as in its grid, or by its database's file name where two agree)."""
    from visroute.evaluation.layout import databases

    out: ModelRuns = {}
    for given in dbs:
        for label, db in databases(given).items():
            if not db.is_file():
                raise FileNotFoundError(f"{given}: model {label!r} has no database yet ({db}); run the grid first")
            store = Store(db)
            try:
                runs = summarize(store, seed=seed, samples=samples)
            finally:
                store.close()
            if label in out:
                label = Path(db).stem
            if label in out:
                raise ValueError(f"two databases hold model {label!r}")
            out[label] = runs
    return out


def _by_name(summaries: list[RunSummary]) -> dict[str, RunSummary]:
    return {s.name: s for s in summaries}


def vision_required_ids(summaries: list[RunSummary]) -> set[str] | None:
    """The items the blind control gets wrong (None without a blind run)."""
    blind = next((s for s in summaries if s.run.kind == "blind"), None)
    return None if blind is None else {i for i, r in blind.rows.items() if not r.correct}


def contrast_values(summaries: list[RunSummary],
                    contrast: Contrast) -> tuple[dict[str, float], dict[str, float]] | None:
    """Item id -> correctness of configs a and b on the items both hold (vision-required ones when asked); None
    when the model lacks either run (or the blind run the items need)."""
    runs = _by_name(summaries)
    a, b = runs.get(contrast.a), runs.get(contrast.b)
    if a is None or b is None:
        return None
    ids = set(a.rows) & set(b.rows)
    if contrast.items == "vision_required":
        needed = vision_required_ids(summaries)
        if needed is None:
            return None
        ids &= needed
    ids = sorted(ids)
    return {i: float(a.rows[i].correct) for i in ids}, {i: float(b.rows[i].correct) for i in ids}


def primary_table(models: ModelRuns, contrasts: Sequence[Contrast], seed: int = 0,
                  samples: int = 1000) -> list[dict]:
    """One row per (task, contrast) that every model can evaluate: the pooled difference, per-model estimates,
    the sign-flip p-value, its Holm adjustment over all rows, and the model-specific flag."""
    tasks = sorted({t for runs in models.values() for t in runs})
    rows = []
    for task in tasks:
        for c in contrasts:
            values = {m: contrast_values(runs.get(task, []), c) for m, runs in models.items()}
            if any(v is None or not v[0] for v in values.values()):
                continue
            pooled = S.pooled_difference({m: v[0] for m, v in values.items()}, {m: v[1] for m, v in values.items()},
                                         samples=samples, seed=seed)  # crossed: items matched by id across models
            p = S.sign_flip_p({m: {i: v[0][i] - v[1][i] for i in v[0]} for m, v in values.items()}, seed=seed)
            rows.append({"task": task, "contrast": c, "pooled": pooled, "p": p})
    adjusted = S.holm({str(i): r["p"] for i, r in enumerate(rows)})
    for i, r in enumerate(rows):
        r["p_holm"] = adjusted[str(i)]
    return rows


def loyalty_table(models: ModelRuns, task: str, seed: int = 0, samples: int = 1000) -> dict[str, S.Pooled]:
    """config -> loyalty pooled over the models that ran it (per model: Wilson interval; pooled: hierarchical
    bootstrap of the per-item agreement)."""
    per_config: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)  # config -> model -> item -> agrees
    wilson: dict[str, dict[str, S.Estimate]] = defaultdict(dict)
    for m, runs in models.items():
        summaries = runs.get(task, [])
        base = next((s for s in summaries if s.run.kind == "unrouted"), None)
        if base is None:
            continue
        unrouted = {i: r.prediction for i, r in base.rows.items()}
        for s in summaries:
            if s.run.kind != "routed":
                continue
            answers = {i: r.prediction for i, r in s.rows.items()}
            wilson[s.name][m] = S.loyalty(answers, unrouted)
            per_config[s.name][m] = {i: float(v) for i, v in S.agreement(answers, unrouted).items()}
    out = {}
    for name, values in per_config.items():
        values = {m: v for m, v in values.items() if v}
        if not values:
            continue
        if len(values) == 1:  # one model: its Wilson interval (a bootstrap collapses when every answer agrees)
            out[name] = S.Pooled(next(wilson[name][m] for m in values), wilson[name])
            continue
        pooled = S.pooled_mean(values, samples=samples, seed=seed)
        out[name] = S.Pooled(pooled.pooled, wilson[name])
    return out


def horizon_inputs(summaries: list[RunSummary], ids: set[str] | None = None) -> dict[str, tuple[dict, dict]]:
    """budget -> (signals: scorer -> layer -> item -> correct, random: layer -> [item -> correct per seed]) from
    a sweep's single-stage prune runs (names action/scorer[-s<seed>]/L<layer>/<budget>) that keep at least one
    token, over `ids` if given."""
    out: dict[str, tuple[dict, dict]] = {}
    for s in summaries:
        parts = s.name.split("/")
        cfg = s.config
        if len(parts) != 4 or not cfg or len(cfg["stages"]) != 1 or cfg["action"] != "prune":
            continue
        if cfg["stages"][0]["keep"] == 0:
            continue  # a stage that keeps nothing selects nothing: every scorer ties there by construction
        budget, layer, scorer = parts[3], int(cfg["stages"][0]["layer"]), cfg["scorer"]
        values = {i: float(r.correct) for i, r in s.rows.items() if ids is None or i in ids}
        signals, random = out.setdefault(budget, ({}, {}))
        if scorer == "random":
            random.setdefault(layer, []).append(values)
        elif scorer not in CONTROLS:
            signals.setdefault(scorer, {})[layer] = values
    return out


def signal_minus_random(models: ModelRuns, task: str) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """budget -> signal -> stage layer -> model -> vision-required accuracy of the signal minus random's (averaged
    over random's seeds), over the items both hold; a model's cell is missing where it lacks either."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for m, runs in models.items():
        summaries = runs.get(task, [])
        needed = vision_required_ids(summaries)
        if needed is None:
            continue
        for budget, (signals, random) in horizon_inputs(summaries, needed).items():
            for scorer, by_layer in signals.items():
                for layer, values in by_layer.items():
                    seeds = random.get(layer, [])
                    ids = [i for i in values if seeds and all(i in r for r in seeds)]
                    if ids:
                        rand = np.mean([[r[i] for i in ids] for r in seeds], axis=0)
                        out[budget][scorer][layer][m] = float(np.mean([values[i] for i in ids]) - np.mean(rand))
    return out


def plot_primary(rows: list[dict], names: list[str], path: Path) -> bool:
    """The primary contrasts (`primary_table` rows) as a forest plot: per contrast the pooled estimate with its
    interval, and each model's estimate as a dot."""
    if not rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.4))
    for y, r in enumerate(rows):
        pooled = r["pooled"].pooled
        ax.plot([pooled.low, pooled.high], [y, y], color="black", lw=1.6)
        ax.plot([pooled.value], [y], marker="D", color="black", ms=6, label="pooled (95% interval)")
        for k, m in enumerate(names):
            e = r["pooled"].per_model.get(m)
            if e is not None and len(names) > 1:
                ax.plot([e.value], [y + 0.12 * (k - (len(names) - 1) / 2)], marker="o", ls="none", ms=5,
                        color=f"C{k % 10}", label=m)
    ax.axvline(0.0, color="grey", lw=1.0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['contrast'].label} (Holm p {r['p_holm']:.3g})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("a - b, accuracy (items as declared)")
    ax.grid(axis="x", alpha=0.3)
    add_legend(fig, [ax])
    save_figure(fig, path)
    return True


def plot_signal_minus_random(models: ModelRuns, task: str, path: Path) -> bool:
    """Signal - random (vision-required accuracy) against the stage layer, a panel per budget: per signal the
    mean over models (models weighed equally) as a line, the range of the models' own values as a band."""
    table = signal_minus_random(models, task)
    if not table:
        return False
    plt = pyplot()
    budgets = sorted(table, key=budget_order)
    cols = min(3, len(budgets))
    rows = -(-len(budgets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(budgets):]:
        ax.set_visible(False)
    for ax, budget in zip(axes.flat, budgets):
        for k, (scorer, by_layer) in enumerate(sorted(table[budget].items())):
            layers = sorted(by_layer)
            values = [list(by_layer[l].values()) for l in layers]
            colour = f"C{k % 10}"
            ax.plot(layers, [np.mean(v) for v in values], marker="o", ms=3, lw=1.3, color=colour, label=scorer)
            ax.fill_between(layers, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.12)
        ax.axhline(0.0, color="black", lw=1.0)
        ax.set_title(budget)
        ax.set_xlabel("stage layer (prune from here on)")
        ax.grid(alpha=0.3)
        integer_ticks(ax)
    for row in axes:
        row[0].set_ylabel("signal - random, vision-required")
    fig.suptitle(f"{task}: each signal against random ({len(models)} model(s); band: the models' range)")
    add_legend(fig, axes)
    save_figure(fig, path)
    return True


def method_curves(models: ModelRuns, task: str) -> dict[str, dict[float, dict[str, float]]]:
    """series -> tier (avg_T) -> model -> vision-required accuracy, for the runs named after a method of
    `visroute.methods` at a tier ("nuwa@48": series "nuwa"), beside the controls at a matched avg_T: random before
    the decoder, averaged over its seeds ("prune/random/L0/T48", "prune/random-s1/L0/T48", ...: series "random
    before the decoder") and the pooling control ("prune/pool/L0/T48": series "pooling")."""
    known = set(methods())
    out: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    seeds: dict = defaultdict(lambda: defaultdict(list))
    for m, runs in models.items():
        for s in runs.get(task, []):
            if s.vision_required is None or s.avg_T is None:
                continue
            parts = s.name.split("/")
            name, _, tier = s.name.rpartition("@")
            if len(parts) == 1 and name in known and tier.replace(".", "", 1).isdigit():
                out[name][float(tier)][m] = s.vision_required
            elif len(parts) == 4 and parts[2] == "L0" and parts[3].startswith("T"):
                if parts[1] == "pool":
                    out["pooling"][round(s.avg_T, 1)][m] = s.vision_required
                elif parts[1] == "random" or parts[1].startswith("random-s"):
                    seeds[round(s.avg_T, 1)][m].append(s.vision_required)
    for tier, by_model in seeds.items():
        for m, values in by_model.items():
            out["random before the decoder"][tier][m] = float(np.mean(values))
    return {k: dict(v) for k, v in out.items()}


def plot_methods_by_budget(models: ModelRuns, task: str, path: Path) -> bool:
    """Vision-required accuracy against avg_T for every named method in the runs (mean over the models, models
    weighed equally; a bar for the models' range), the controls at the same avg_T dashed, the unrouted model's
    mean a grey line. Draws nothing where fewer than two methods ran."""
    curves = method_curves(models, task)
    controls = ("random before the decoder", "pooling")
    if sum(k not in controls for k in curves) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    unrouted = [s.vision_required for runs in models.values() for s in runs.get(task, [])
                if s.run.kind == "unrouted" and s.vision_required is not None]
    if unrouted:
        ax.axhline(float(np.mean(unrouted)), color="grey", lw=1.0, label="unrouted")
    for k, (name, by_tier) in enumerate(sorted(curves.items(), key=lambda kv: (kv[0] in controls, kv[0]))):
        tiers = sorted(by_tier)
        mean = [float(np.mean(list(by_tier[t].values()))) for t in tiers]
        low = [mean[i] - min(by_tier[t].values()) for i, t in enumerate(tiers)]
        high = [max(by_tier[t].values()) - mean[i] for i, t in enumerate(tiers)]
        style = dict(ls="--", lw=2.0, color="black" if name == "pooling" else "dimgrey") if name in controls else \
            dict(ls="-", lw=1.3, color=f"C{k % 10}", marker="os^vD<>ph*"[k // 10 % 10])
        ax.errorbar(tiers, mean, yerr=[low, high], capsize=2, ms=4, label=name, **style)
    ax.set_xlabel("avg_T (visual tokens per decoder layer)")
    ax.set_ylabel("vision-required accuracy")
    ax.set_title(f"{task}: the named methods at matched avg_T ({len(models)} model(s); bars: the models' range)")
    ax.grid(alpha=0.3)
    add_legend(fig, [ax])
    save_figure(fig, path)
    return True


def item_families(summaries: list[RunSummary]) -> dict[str, str]:
    """Item id -> question family (the testbed's items carry one), from the unrouted run."""
    base = next((s for s in summaries if s.run.kind == "unrouted"), None)
    if base is None:
        return {}
    return {i: r.metrics["family"] for i, r in base.rows.items() if r.metrics.get("family")}


def horizon_table(models: ModelRuns, task: str, delta: float, seed: int = 0, samples: int = 1000,
                  min_seeds: int = S.HORIZON_MIN_SEEDS, family: str | None = None
                  ) -> dict[str, dict[str, tuple[int | None, list[S.HorizonLayer]] | str]]:
    """budget -> model -> (horizon, per-layer rows) on the vision-required items (of `family` when given), or a
    reason it is missing."""
    out: dict[str, dict] = defaultdict(dict)
    for m, runs in models.items():
        summaries = runs.get(task, [])
        needed = vision_required_ids(summaries)
        if family is not None and needed is not None:
            fams = item_families(summaries)
            needed = {i for i in needed if fams.get(i) == family}
        for budget, (signals, random) in horizon_inputs(summaries, needed).items():
            if not signals:
                continue
            seeds = min((len(v) for v in random.values()), default=0)
            if seeds < min_seeds:
                out[budget][m] = f"needs random at {min_seeds} seeds (has {seeds})"
                continue
            out[budget][m] = S.horizon_by_interval(signals, random, delta=delta, min_seeds=min_seeds,
                                                   samples=samples, seed=seed)
    return out


def horizon_text(h: tuple[int | None, list[S.HorizonLayer]] | str | None) -> str:
    """A `horizon_table` cell: the horizon layer with best - random there (or at the last layer) and the items
    measured, or why it is missing."""
    if h is None or isinstance(h, str):
        return h or "-"
    layer, rows = h
    at = next((r for r in rows if r.layer == layer), rows[-1] if rows else None)
    where = "not reached" if layer is None else f"layer {layer}"
    return where + (f" ({at.best}: {_ci(at.difference, True)}, n={at.difference.n})" if at else "")


def chance_by_family() -> dict[str, float]:
    """The testbed's chance accuracy per vision family: a uniform guess among an item's answer choices, averaged
    over the family's question forms (drawn equally); 0 for box answers."""
    from visroute.testbed.questions import TEMPLATES, VISION_FAMILIES, answer_choices

    out = {}
    for fam in VISION_FAMILIES:
        chances = []
        for t in TEMPLATES[fam]:
            choices = answer_choices(fam, t)
            chances.append(1.0 / len(choices) if choices else 0.0)
        out[fam] = float(np.mean(chances))
    return out


def chance_corrected_table(summaries: list[RunSummary]) -> dict[str, S.FamilyAccuracy]:
    """config -> chance-corrected accuracy per testbed family (blind-solvable left out), equal weights."""
    chance = chance_by_family()
    out = {}
    for s in summaries:
        rows = [(r.metrics.get("family"), r.correct, chance.get(r.metrics.get("family"), 0.0))
                for r in s.rows.values() if r.metrics.get("family")]
        if rows:
            out[s.name] = S.chance_corrected(rows)
    return out


# ---- Markdown ---------------------------------------------------------------------------------------------------
def _ci(e: S.Estimate, signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    return f"{e.value:{fmt}} [{e.low:{fmt}}, {e.high:{fmt}}]"


def pooled_sections(models: ModelRuns, contrasts: Sequence[Contrast] = (), seed: int = 0,
                    delta: float = S.HORIZON_DELTA, samples: int = 1000, loyalty: bool = True) -> list[str]:
    """The Markdown of the pooled report (see the module docstring); with one model, the same statistics on it
    alone. `loyalty=False` leaves the loyalty tables out (a report whose run tables carry it already)."""
    names = list(models)
    if len(names) > 1:
        lines = [f"# Across models: {', '.join(f'`{m}`' for m in names)}", "",
                 "Pooled estimates weigh models equally, with a hierarchical bootstrap interval (models, then items; "
                 "95%); each model's own estimate has an interval over its items. A claim whose sign differs across "
                 "models is flagged model-specific.", ""]
    else:
        lines = [f"# Declared contrasts, information horizon and chance-corrected accuracy (`{names[0]}`)", ""]
    if not contrasts:
        lines += ["The grid declares no primary contrasts (its `primary` key): every comparison in this report is "
                  "exploratory.", ""]
    else:
        rows = primary_table(models, contrasts, seed, samples)
        lines += ["## Primary contrasts (declared in the grid, Holm-corrected)", ""]
        if len(names) > 1:
            lines += ["a - b in accuracy on the same items (matched by id across models); p from a paired sign-flip "
                      "test over items (an item flips for every model at once; exact up to 16 differing items, else "
                      "10,000 random sign vectors; models weighed equally; p conditions on the models, whose "
                      "variation shows in the pooled interval and the flag), Holm-adjusted over the rows of this "
                      "table. Every other comparison in the reports is exploratory.", "",
                      "| task | contrast | items | pooled [95% CI] | " + " | ".join(names) + " | p | p (Holm) | |",
                      "|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
        else:
            lines += ["a - b in accuracy on the same items, with a paired bootstrap interval over items (95%); p "
                      "from a paired sign-flip test over items (exact up to 16 differing items, else 10,000 random "
                      "sign vectors), Holm-adjusted over the rows of this table. Every other comparison in this "
                      "report is exploratory.", "",
                      "| task | contrast | items | a - b [95% CI] | n | p | p (Holm) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            c, pooled = r["contrast"], r["pooled"]
            if len(names) == 1:
                one = pooled.per_model[names[0]]
                lines.append(f"| {r['task']} | {c.label} | {c.items} | {_ci(one, True)} | {one.n} | {r['p']:.4f} | "
                             f"{r['p_holm']:.4f} |")
                continue
            cells = [_ci(pooled.per_model[m], True) + f" (n={pooled.per_model[m].n})" for m in names]
            flag = "model-specific" if pooled.model_specific else ""
            lines.append(f"| {r['task']} | {c.label} | {c.items} | {_ci(pooled.pooled, True)} | " + " | ".join(cells)
                         + f" | {r['p']:.4f} | {r['p_holm']:.4f} | {flag} |")
        missing = [c.label for c in contrasts if not any(r["contrast"] == c for r in rows)]
        if missing:
            lines += ["", "Not evaluated (a model lacks a run or the blind control): " + "; ".join(missing)]
        lines.append("")
    for task in sorted({t for runs in models.values() for t in runs}):
        loyal = loyalty_table(models, task, seed, samples) if loyalty else {}
        if loyal:
            lines += [f"## Loyalty ({task})", "",
                      "Share of items whose answer equals the unrouted model's (exact-match normalisation): pooled "
                      "with a hierarchical bootstrap, per model with a Wilson interval, 95%.", "",
                      "| config | pooled | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for name in sorted(loyal):
                p = loyal[name]
                cells = [_ci(p.per_model[m]) if m in p.per_model else "-" for m in names]
                lines.append(f"| {name} | {_ci(p.pooled)} | " + " | ".join(cells) + " |")
            lines.append("")
        families = sorted({f for runs in models.values() for f in item_families(runs.get(task, [])).values()}
                          - {"blind_solvable"})
        tables = [(None, horizon_table(models, task, delta, seed, samples))]
        tables += [(f, horizon_table(models, task, delta, seed, samples, family=f)) for f in families]
        if tables[0][1]:
            lines += [f"## Information horizon by an interval criterion ({task})", "",
                      "First stage layer from which the upper end of the 95% interval of best - random lies below "
                      f"{delta:g} at that layer and every deeper one, on the vision-required items (all, then per "
                      "family): the best signal (controls excluded) chosen on a random half of the items and "
                      "measured on the other half, random averaged over its seeds. In brackets, best - random at the "
                      "horizon (or at the last layer) and the items measured. Few items make wide intervals: a "
                      "horizon not reached may be a lack of resolution, not of difference.", "",
                      "| budget | items | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for family, horizons in tables:
                for budget in sorted(horizons, key=budget_order):
                    cells = [horizon_text(horizons[budget].get(m)) for m in names]
                    values = [h[0] for h in horizons[budget].values() if isinstance(h, tuple)]
                    flag = " (differs across models)" if len(set(values)) > 1 else ""
                    lines.append(f"| {budget}{flag} | {family or 'all'} | " + " | ".join(cells) + " |")
            lines.append("")
        per_model = {m: chance_corrected_table(runs.get(task, [])) for m, runs in models.items()}
        if any(per_model.values()):
            configs = sorted({c for t in per_model.values() for c in t})
            lines += [f"## Chance-corrected accuracy ({task})", "",
                      "Per family (acc - chance) / (1 - chance), chance a uniform guess among the answer choices (0 "
                      "for boxes); the mean over the vision families with equal weights (the blind-solvable family "
                      "left out by its label), beside vision-required accuracy (the items the blind control gets "
                      "wrong):", "",
                      "| config | " + " | ".join(f"{m}: chance-corr. | {m}: vision-req." for m in names) + " |",
                      "|---|" + "---|---|" * len(names)]
            for c in configs:
                cells = []
                for m in names:
                    fa = per_model[m].get(c)
                    vr = _by_name(models[m].get(task, [])).get(c)
                    cells += [format_value(fa.weighted if fa else None),
                              format_value(vr.vision_required if vr else None)]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def write_pooled_report(dbs: Sequence[str | Path], out: str | Path, contrasts: Sequence[Contrast] = (),
                        seed: int = 0, delta: float = S.HORIZON_DELTA) -> Path:
    """Write `pooled.md` for databases `dbs` (one per model) into folder `out`; returns its path."""
    models = load(dbs, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pooled.md"
    lines = pooled_sections(models, contrasts, seed=seed, delta=delta) + figure_sections(models, out, contrasts, seed)
    path.write_text("\n".join(lines))
    return path


def figure_sections(models: ModelRuns, out: Path, contrasts: Sequence[Contrast] = (), seed: int = 0,
                    samples: int = 1000) -> list[str]:
    """Draw the figures pooled over `models` into folder `out` and return the Markdown that shows them."""
    lines = []
    rows = primary_table(models, contrasts, seed, samples) if contrasts else []
    for task in sorted({r["task"] for r in rows}):
        figure = f"{task}_primary.png"
        if plot_primary([r for r in rows if r["task"] == task], list(models), out / figure):
            lines += [f"## The primary contrasts ({task})", "",
                      "Each declared contrast: the pooled estimate with its 95% interval (black), each model's own "
                      "estimate (dots); Holm-adjusted p in the label.", "", f"![primary contrasts]({figure})", ""]
    for task in sorted({t for runs in models.values() for t in runs}):
        figure = f"{task}_methods_by_budget.png"
        if plot_methods_by_budget(models, task, out / figure):
            lines += [f"## The named methods at matched avg_T ({task})", "",
                      "Vision-required accuracy of each method preset against its avg_T: the mean over the models "
                      "(bars: the models' range), with random selection before the decoder (its seeds averaged) "
                      "and the pooling control at the same avg_T where the grid runs them, and the unrouted model "
                      "(exploratory; the declared contrasts are above).", "", f"![methods by budget]({figure})", ""]
        figure = f"{task}_signal_minus_random.png"
        if plot_signal_minus_random(models, task, out / figure):
            lines += [f"## Each signal against random ({task})", "",
                      "Vision-required accuracy of one prune stage minus random's at the same layer and budget "
                      "(random averaged over its seeds), per signal: the mean over the models as a line, the range "
                      "of the models' own values as a band (exploratory; the declared contrasts are above).", "",
                      f"![signal - random]({figure})", ""]
    return lines

"""Statistics for studies over several models: a hierarchical bootstrap (models, then items), paired sign-flip
tests with Holm's correction for declared primary contrasts, loyalty to the unrouted model, the information
horizon by an interval criterion, and chance-corrected accuracy per family with fixed family weights.

Conventions:

* The pooled estimate over models weighs every model equally: the mean over models of each model's mean over
  its items (a model with more items does not count more).
* Hierarchical bootstrap, models then items, in two designs:
  - nested (each model's values a plain sequence: its items have nothing to do with another model's): the
    two-stage bootstrap of Davison & Hinkley (1997, §3.8). A replicate draws M models with replacement, then,
    for each drawn model, its n items with replacement, and takes the pooled mean. Its variance is
    (1/M)[var of the model means + mean of each model's item variance / n].
  - crossed (each model's values keyed by item id: the models answered the same questions, the usual case): the
    pigeonhole bootstrap of Owen (2007, "The pigeonhole bootstrap", Ann. Appl. Stat.). A replicate draws M
    models with replacement and, independently, |U| item ids with replacement from the union U of the models'
    items; each drawn model's mean is over the drawn items it holds (with their multiplicity). An item drawn
    once counts for every model, so two models that agree item by item give the interval of one model, where
    the nested design would treat them as independent evidence and narrow it. For values v = a_model +
    b_item the variance is var(a)/M + var(b)/|U| exactly.
  With two or three models the model level has only a few distinct draws, so an interval that covers models is
  wide by design; a claim is flagged model-specific when the models' own estimates differ in sign.
* p-values of contrasts come from a paired sign-flip (randomisation) test, not from the bootstrap: under the null
  that the two configs' labels are exchangeable on each item, each item's difference keeps its size and flips
  its sign with probability 1/2, independently per item. The statistic is the pooled mean difference (models
  weighed equally). With values keyed by item id (crossed) an item flips for every model at once, so models
  that agree item by item count as one; with plain sequences (nested) every model's items flip on their own.
  The test conditions on the models: their variation shows in the bootstrap interval and the model-specific
  flag, not in p. It is exact (every sign vector) when at most `EXACT_FLIPS` items differ, else Monte Carlo with
  the (1 + hits) / (1 + draws) estimate, which is never 0.
* Holm's step-down correction controls the family-wise error of the declared primary contrasts; everything else
  a report shows is exploratory.
* Loyalty: the share of items whose answer equals the unrouted model's, with a Wilson score interval (which
  does not collapse to [1, 1] when every answer agrees, as a bootstrap would).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from visroute.evaluation.metrics import BOOTSTRAP_SAMPLES, normalize_exact

EXACT_FLIPS = 16  # exact sign-flip test up to 2**16 sign vectors
SIGN_FLIP_SAMPLES = 10_000
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
HORIZON_DELTA = 0.05  # the information horizon's margin: best - random below it (one item is 3-5 points of a family)
HORIZON_MIN_SEEDS = 5  # random's seeds averaged at each layer of the horizon


# ---- hierarchical bootstrap ----------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A point estimate with its percentile interval."""

    value: float
    low: float
    high: float
    n: int  # items (summed over models for a pooled estimate)


@dataclass
class Pooled:
    """A quantity pooled over models: the pooled estimate and interval (models, then items), each model's own
    estimate with an item-only interval, and `model_specific` when the models' estimates differ in sign."""

    pooled: Estimate
    per_model: dict[str, Estimate] = field(default_factory=dict)

    @property
    def model_specific(self) -> bool:
        return sign_differs([e.value for e in self.per_model.values()])


def sign_differs(values: Sequence[float]) -> bool:
    """True when some values are above 0 and others below (zeros take no side)."""
    return any(v > 0 for v in values) and any(v < 0 for v in values)


Values = Mapping[str, Sequence[float]] | Mapping[str, Mapping[str, float]]  # model -> per-item values


def _keyed(values: Values) -> bool:
    """True when every model's values are keyed by item id (the crossed design), False when none are."""
    kinds = {isinstance(v, Mapping) for v in values.values()}
    if len(kinds) > 1:
        raise ValueError("give every model's values keyed by item id, or none")
    return kinds == {True}


def _as_arrays(values: Values) -> dict[str, np.ndarray]:
    if not values:
        raise ValueError("a pooled estimate needs at least one model")
    out = {name: np.asarray(list(v.values()) if isinstance(v, Mapping) else v, dtype=float)
           for name, v in values.items()}
    empty = [name for name, v in out.items() if v.size == 0]
    if empty:
        raise ValueError(f"model(s) {', '.join(empty)} have no items")
    return out


def hierarchical_replicates(values: Values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples,) bootstrap replicates of the pooled mean, models then items (see the module docstring): nested
    when each model's values are a sequence, crossed (pigeonhole) when they map item ids to values.

    Draw order (what a reference with the same generator reproduces): first a (samples, M) array of model
    picks; then, nested, for each model m in the mapping's order a (samples, M, n_m) array of item indices, of
    which a slot uses the one of the model it picked; crossed, one (samples, |U|) array of indices into the
    sorted union U of item ids. A crossed replicate in which a drawn model holds none of the drawn items leaves
    that slot out of the replicate's mean."""
    arrays = _as_arrays(values)
    m = len(arrays)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, m, size=(samples, m))
    if _keyed(values):
        union = sorted(set().union(*(v.keys() for v in values.values())))
        col = {item: j for j, item in enumerate(union)}
        table = np.zeros((m, len(union)))
        held = np.zeros((m, len(union)))
        for k, v in enumerate(values.values()):
            for item, x in v.items():
                table[k, col[item]], held[k, col[item]] = float(x), 1.0
        draws = rng.integers(0, len(union), size=(samples, len(union)))
        counts = np.zeros((samples, len(union)))
        np.add.at(counts, (np.arange(samples)[:, None], draws), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (counts @ table.T) / (counts @ held.T)  # (samples, M): each model's mean over the drawn items
        slot_means = np.take_along_axis(means, picks, axis=1)
        return np.nanmean(slot_means, axis=1)
    slot_means = np.empty((samples, m))
    for j, v in enumerate(arrays.values()):
        idx = rng.integers(0, v.size, size=(samples, m, v.size))
        means = v[idx].mean(-1)  # (samples, M): model j's resampled mean, were it drawn into each slot
        slot_means = np.where(picks == j, means, slot_means)
    return slot_means.mean(1)


def pooled_mean(values: Values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95) -> Pooled:
    """Per-item values of each model (model -> per-item values, e.g. 0/1 correctness for an accuracy, or a paired
    difference per item; keyed by item id for the crossed design) pooled over models (equal weights) with a
    hierarchical bootstrap interval, and each model's own mean with an item bootstrap interval."""
    arrays = _as_arrays(values)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    per_model = {}
    for name, v in arrays.items():
        reps = v[np.random.default_rng(seed).integers(0, v.size, size=(samples, v.size))].mean(1)
        lo, hi = np.quantile(reps, q)
        per_model[name] = Estimate(float(v.mean()), float(lo), float(hi), int(v.size))
    reps = hierarchical_replicates(values, samples, seed)
    lo, hi = np.nanquantile(reps, q)
    value = float(np.mean([v.mean() for v in arrays.values()]))
    return Pooled(Estimate(value, float(lo), float(hi), sum(v.size for v in arrays.values())), per_model)


def pooled_difference(a: Values, b: Values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                      level: float = 0.95) -> Pooled:
    """a - b pooled over models: per model, the paired per-item differences of two configs on the same items
    (equal lengths in the same order, or the same item ids), then `pooled_mean` of the differences (items
    resampled as pairs)."""
    if set(a) != set(b):
        raise ValueError(f"paired values need the same models: {sorted(a)} vs {sorted(b)}")
    diffs: dict = {}
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, Mapping) or isinstance(y, Mapping):
            if not (isinstance(x, Mapping) and isinstance(y, Mapping)) or set(x) != set(y):
                raise ValueError(f"model {name}: paired values need the same items")
            diffs[name] = {i: float(x[i]) - float(y[i]) for i in x}
            continue
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"model {name}: paired values need the same items ({len(x)} vs {len(y)})")
        diffs[name] = x - y
    return pooled_mean(diffs, samples, seed, level)


# ---- tests and multiplicity ----------------------------------------------------------------------------------
def sign_flip_p(differences: Values | Sequence[float], samples: int = SIGN_FLIP_SAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip test that the pooled mean difference is 0 (see the module
    docstring). `differences` is one sequence of per-item differences, or model -> such a sequence (nested:
    each model's items flip on their own), or model -> item id -> difference (crossed: an item flips for every
    model at once). The statistic weighs models equally. 1.0 when no item differs."""
    groups = differences if isinstance(differences, Mapping) else {"": differences}
    arrays = _as_arrays(groups)
    m = len(arrays)
    if _keyed(groups):
        by_item: dict[str, float] = defaultdict(float)  # each item's share of the pooled mean, over models
        for v in groups.values():
            for item, x in v.items():
                by_item[item] += float(x) / (len(v) * m)
        d = np.array(list(by_item.values()))
    else:
        d = np.concatenate([v / (v.size * m) for v in arrays.values()])  # the pooled mean is the sum of these
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-12 * np.abs(d).sum()  # ties within rounding count as at least as extreme
    if d.size <= EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) >= observed))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(samples, d.size))
    hits = int(np.sum(np.abs(signs @ d) >= observed))
    return (1 + hits) / (1 + samples)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down): with p_(1) <= ... <= p_(m), adj_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). A contrast is significant at family-wise level alpha when its adjusted p < alpha."""
    bad = {k: p for k, p in pvalues.items() if not 0.0 <= p <= 1.0 or math.isnan(p)}
    if bad:
        raise ValueError(f"p-values must lie in [0, 1]: {bad}")
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


# ---- loyalty ---------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaN, NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    z = Z95 if abs(level - 0.95) < 1e-12 else _normal_quantile(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def loyalty(answers: Mapping[str, str], unrouted: Mapping[str, str],
            normalize: Callable[[str], str] = normalize_exact, level: float = 0.95) -> Estimate:
    """Share of the items (those both hold) whose answer equals the unrouted model's answer after `normalize`
    (default: exact-match normalisation), with a Wilson interval. For box answers pass a `normalize` that
    parses the box, or compare IoU yourself."""
    same = agreement(answers, unrouted, normalize)
    lo, hi = wilson_interval(sum(same.values()), len(same), level)
    return Estimate(sum(same.values()) / len(same) if same else float("nan"), lo, hi, len(same))


def agreement(answers: Mapping[str, str], unrouted: Mapping[str, str],
              normalize: Callable[[str], str] = normalize_exact) -> dict[str, bool]:
    """Item id -> whether the answer equals the unrouted answer after `normalize`, on the items both hold."""
    return {i: normalize(answers[i]) == normalize(unrouted[i]) for i in sorted(set(answers) & set(unrouted))}


# ---- the information horizon -----------------------------------------------------------------------------------
@dataclass
class HorizonLayer:
    """At one stage layer: the signal chosen on the selection half, and best - random (random averaged over its
    seeds) on the other half, with its paired bootstrap interval."""

    layer: int
    best: str
    difference: Estimate


def split_items(ids: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded random split of item ids into two halves (selection, measurement)."""
    order = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    half = len(order) // 2
    return sorted(order[i] for i in perm[:half]), sorted(order[i] for i in perm[half:])


def horizon_by_interval(signals: Mapping[str, Mapping[int, Mapping[str, float]]],
                        random: Mapping[int, Sequence[Mapping[str, float]]], delta: float = HORIZON_DELTA,
                        min_seeds: int = HORIZON_MIN_SEEDS, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                        level: float = 0.95) -> tuple[int | None, list[HorizonLayer]]:
    """The information horizon by an interval criterion: the first stage layer from which, at that layer and
    every deeper one, the upper bound of the `level` interval of best - random lies below `delta`.

    `signals`: scorer -> layer -> item id -> value (e.g. 0/1 correctness on the vision-required items; controls
    excluded by the caller); `random`: layer -> one item -> value mapping per random seed (at least
    `min_seeds`). Items are those every run at the layer holds. Per layer, the best signal is the one with the
    highest mean on a seeded random half of the items (`split_items`); best - random is measured on the other
    half, random's value per item being its mean over the seeds, with a paired bootstrap interval. Returns the
    horizon (None when the last layer already fails) and the per-layer rows (layers where random and a signal
    both ran)."""
    from visroute.evaluation.metrics import paired_bootstrap_diff

    rows: list[HorizonLayer] = []
    layers = sorted(set(random) & {l for by in signals.values() for l in by})
    for layer in layers:
        seeds = list(random[layer])
        if len(seeds) < min_seeds:
            raise ValueError(f"layer {layer}: random needs at least {min_seeds} seeds, got {len(seeds)}")
        names = sorted(s for s, by in signals.items() if layer in by)
        ids = set.intersection(*(set(signals[s][layer]) for s in names), *(set(r) for r in seeds))
        if len(ids) < 2:
            continue
        pick, measure = split_items(list(ids), seed)
        best = max(names, key=lambda s: (np.mean([signals[s][layer][i] for i in pick]), -names.index(s)))
        rnd = [float(np.mean([r[i] for r in seeds])) for i in measure]
        d, lo, hi = paired_bootstrap_diff([signals[best][layer][i] for i in measure], rnd, samples=samples,
                                          seed=seed, level=level)
        rows.append(HorizonLayer(layer, best, Estimate(d, lo, hi, len(measure))))
    found = None
    for row in reversed(rows):
        if not row.difference.high < delta:
            break
        found = row.layer
    return found, rows


# ---- chance-corrected accuracy ---------------------------------------------------------------------------------
@dataclass
class FamilyAccuracy:
    """Per family: accuracy, chance and chance-corrected accuracy; `weighted` their fixed-weight mean."""

    accuracy: dict[str, float]
    chance: dict[str, float]
    corrected: dict[str, float]
    weighted: float


def chance_corrected(rows: Sequence[tuple[str, bool, float]], weights: Mapping[str, float] | None = None,
                     exclude: Sequence[str] = ("blind_solvable",)) -> FamilyAccuracy:
    """Chance-corrected accuracy per family, (acc - chance) / (1 - chance), and their mean with fixed family
    weights (default: equal), from (family, correct, chance) rows, chance being the probability that a uniform
    guess among the item's answer choices is right (0 for an answer without a finite set, e.g. a box). Families
    named in `exclude` (the blind-solvable family, by its label) are left out; a family whose chance is 1 has
    no corrected accuracy."""
    by: dict[str, list[tuple[bool, float]]] = {}
    for family, correct, chance in rows:
        if family not in exclude:
            by.setdefault(family, []).append((bool(correct), float(chance)))
    acc = {f: float(np.mean([c for c, _ in v])) for f, v in by.items()}
    chance = {f: float(np.mean([p for _, p in v])) for f, v in by.items()}
    corrected = {f: (acc[f] - chance[f]) / (1 - chance[f]) for f in by if chance[f] < 1}
    w = {f: (1.0 if weights is None else float(weights.get(f, 0.0))) for f in corrected}
    missing = [f for f in (weights or {}) if f not in corrected and f not in exclude]
    if missing:
        raise ValueError(f"family weights name families without items: {', '.join(sorted(missing))}")
    total = sum(w.values())
    weighted = sum(w[f] * corrected[f] for f in corrected) / total if total > 0 else float("nan")
    return FamilyAccuracy(acc, chance, corrected, weighted)

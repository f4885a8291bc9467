"""Statistics over several models against independent references: the hierarchical bootstrap against its exact
variance and a slow nested-loop reference, the sign-flip test and Holm against hand-computed values, loyalty
against hand counts, the interval horizon on synthetic results with a known horizon, chance-corrected accuracy
by hand."""

import math
import random

import numpy as np
import pytest

from visroute.evaluation import statistics as S


def _models():
    rng = np.random.default_rng(3)
    return {"m1": (rng.random(40) < 0.8).astype(float), "m2": (rng.random(25) < 0.5).astype(float),
            "m3": (rng.random(60) < 0.65).astype(float)}


def test_hierarchical_bootstrap_matches_nested_loop_reference():
    # the same generator, consumed in the documented order, read by explicit loops
    values = _models()
    samples = 200
    fast = S.hierarchical_replicates(values, samples=samples, seed=7)
    rng = np.random.default_rng(7)
    arrays = list(values.values())
    m = len(arrays)
    picks = rng.integers(0, m, size=(samples, m))
    draws = [rng.integers(0, len(v), size=(samples, m, len(v))) for v in arrays]
    slow = []
    for b in range(samples):
        total = 0.0
        for slot in range(m):
            j = picks[b, slot]
            items = draws[j][b, slot]
            total += sum(arrays[j][i] for i in items) / len(items)
        slow.append(total / m)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_hierarchical_bootstrap_variance_is_the_two_stage_formula():
    # Var of a replicate = (1/M) [ (1/M) sum (mu_m - mu)^2 + (1/M) sum s_m^2 / n_m ], s_m^2 the plug-in variance
    values = _models()
    mus = np.array([v.mean() for v in values.values()])
    within = np.array([v.var() / len(v) for v in values.values()])
    m = len(values)
    expected = (np.mean((mus - mus.mean()) ** 2) + within.mean()) / m
    reps = S.hierarchical_replicates(values, samples=20000, seed=1)
    assert reps.mean() == pytest.approx(mus.mean(), abs=0.004)
    assert reps.var() == pytest.approx(expected, rel=0.05)
    # item sampling alone would be far narrower: model variance is counted
    assert expected > 2 * within.mean() / m


def test_hierarchical_bootstrap_against_an_independent_random_stream():
    # a plain-Python two-stage bootstrap (another generator): the same distribution, quantiles within noise
    values = _models()
    arrays = [list(v) for v in values.values()]
    r = random.Random(11)
    slow = []
    for _ in range(4000):
        chosen = [arrays[r.randrange(len(arrays))] for _ in arrays]
        slow.append(sum(sum(a[r.randrange(len(a))] for _ in a) / len(a) for a in chosen) / len(chosen))
    fast = S.hierarchical_replicates(values, samples=4000, seed=2)
    for q in (0.025, 0.5, 0.975):
        assert np.quantile(fast, q) == pytest.approx(np.quantile(slow, q), abs=0.02)


def _crossed():
    # three models on the same 50 items, one of them missing ten: keyed by item id
    rng = np.random.default_rng(4)
    ids = [f"q{k}" for k in range(50)]
    skill = {"m1": 0.8, "m2": 0.55, "m3": 0.7}
    out = {m: {i: float(rng.random() < p) for i in ids} for m, p in skill.items()}
    for i in ids[:10]:
        del out["m3"][i]
    return out


def test_crossed_bootstrap_matches_nested_loop_reference():
    values = _crossed()
    samples = 200
    fast = S.hierarchical_replicates(values, samples=samples, seed=9)
    rng = np.random.default_rng(9)
    models = list(values)
    union = sorted(set().union(*values.values()))
    picks = rng.integers(0, len(models), size=(samples, len(models)))
    draws = rng.integers(0, len(union), size=(samples, len(union)))
    slow = []
    for b in range(samples):
        slot = []
        for s_ in range(len(models)):
            held = values[models[picks[b, s_]]]
            got = [held[union[j]] for j in draws[b] if union[j] in held]
            if got:
                slot.append(sum(got) / len(got))
        slow.append(sum(slot) / len(slot))
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_crossed_bootstrap_variance_for_additive_values_and_agreeing_models():
    # v[m, i] = a_m + b_i: a replicate is mean(a over drawn models) + mean(b over drawn items), independent:
    # variance var(a) / M + var(b) / n exactly
    rng = np.random.default_rng(6)
    a = {"m1": 0.1, "m2": 0.3, "m3": 0.6, "m4": 0.2}
    b = {f"q{k}": float(x) for k, x in enumerate(rng.normal(0, 1, 80))}
    values = {m: {i: am + bi for i, bi in b.items()} for m, am in a.items()}
    reps = S.hierarchical_replicates(values, samples=20000, seed=3)
    expected = np.var(list(a.values())) / 4 + np.var(list(b.values())) / 80
    assert reps.var() == pytest.approx(expected, rel=0.05)
    # two models that agree item by item are one model's evidence, not two: the pooled interval is the item
    # interval of either (the nested design would narrow it by about 1/sqrt(2))
    one = {f"q{k}": float(x) for k, x in enumerate(rng.random(60) < 0.6)}
    twice = S.pooled_mean({"m1": one, "m2": dict(one)}, samples=4000, seed=1)
    single = twice.per_model["m1"]
    assert twice.pooled.high - twice.pooled.low == pytest.approx(single.high - single.low, rel=0.1)
    nested = S.pooled_mean({"m1": list(one.values()), "m2": list(one.values())}, samples=4000, seed=1)
    assert nested.pooled.high - nested.pooled.low < 0.8 * (single.high - single.low)


def test_keyed_and_plain_values_do_not_mix():
    with pytest.raises(ValueError, match="keyed by item id"):
        S.pooled_mean({"m1": {"a": 1.0}, "m2": [1.0]})
    with pytest.raises(ValueError, match="same items"):
        S.pooled_difference({"m1": {"a": 1.0}}, {"m1": {"b": 1.0}})


def test_pooled_difference_per_model_and_model_specific_flag():
    a = {"m1": [1, 1, 1, 1, 0, 1, 1, 1], "m2": [0, 0, 1, 0, 0, 0, 1, 0]}
    b = {"m1": [0, 1, 0, 1, 0, 0, 1, 0], "m2": [1, 0, 1, 1, 0, 1, 1, 0]}
    p = S.pooled_difference(a, b, samples=500)
    assert p.per_model["m1"].value == pytest.approx(4 / 8)  # 7/8 - 3/8
    assert p.per_model["m2"].value == pytest.approx(-3 / 8)  # 2/8 - 5/8
    assert p.pooled.value == pytest.approx((4 / 8 - 3 / 8) / 2)
    assert p.model_specific
    assert p.pooled.low <= p.pooled.value <= p.pooled.high
    same_sign = S.pooled_difference(a, {"m1": b["m1"], "m2": [0, 0, 0, 0, 0, 0, 0, 0]}, samples=200)
    assert not same_sign.model_specific
    # per-model intervals are item bootstraps of that model alone
    lo, hi = p.per_model["m1"].low, p.per_model["m1"].high
    assert lo < 4 / 8 < hi
    with pytest.raises(ValueError, match="same models"):
        S.pooled_difference(a, {"m1": b["m1"]})
    with pytest.raises(ValueError, match="same items"):
        S.pooled_difference(a, {"m1": b["m1"][:3], "m2": b["m2"]})


def test_sign_flip_exact_by_hand():
    # d = [1, 1, 1, 0]: the zero carries no sign; of the 8 sign vectors of the three ones, |sum| >= 3 for 2
    assert S.sign_flip_p([1, 1, 1, 0]) == pytest.approx(2 / 8)
    # d = [1, 1, -1]: |sum| = 1; sign vectors give sums 3, 1, 1, -1, 1, -1, -1, -3: all |sum| >= 1
    assert S.sign_flip_p([1, 1, -1]) == pytest.approx(1.0)
    # d = [2, 1, 1]: sums +-4 (2 vectors), +-2 (6 vectors): |sum| >= 4 for 2 of 8
    assert S.sign_flip_p([2, 1, 1]) == pytest.approx(2 / 8)
    assert S.sign_flip_p([0, 0]) == 1.0
    # two models weighed equally: m1 [1] (weight 1/2), m2 [1, 1] (weights 1/4): sums of +-1/2 +-1/4 +-1/4,
    # |observed| = 1, reached by 2 of the 8 sign vectors
    assert S.sign_flip_p({"m1": [1], "m2": [1, 1]}) == pytest.approx(2 / 8)
    # the same keyed by item (crossed): item x carries 1/2 + 1/4, item y 1/4; |+-3/4 +-1/4| >= 1 for 2 of 4
    assert S.sign_flip_p({"m1": {"x": 1}, "m2": {"x": 1, "y": 1}}) == pytest.approx(2 / 4)
    # two models that agree item by item are one model's evidence
    d = {"a": 1, "b": 1, "c": 1, "d": -1, "e": 1}
    assert S.sign_flip_p({"m1": d, "m2": dict(d)}) == pytest.approx(S.sign_flip_p(list(d.values())))


def test_sign_flip_monte_carlo_near_exact():
    # 20 non-zero differences: Monte Carlo; the exact p of 15 ones and 5 minus ones is P(|2X - 20| >= 10),
    # X ~ Bin(20, 1/2), = 2 * P(X >= 15)
    d = [1] * 15 + [-1] * 5
    exact = 2 * sum(math.comb(20, k) for k in range(15, 21)) / 2 ** 20
    assert S.sign_flip_p(d, samples=40000) == pytest.approx(exact, abs=0.004)


def test_holm_by_hand():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    # sorted: d .005 (x4 = .02), a .01 (x3 = .03), c .03 (x2 = .06), b .04 (x1 = .04 -> max .06)
    assert S.holm(p) == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert S.holm({"x": 0.6, "y": 0.5}) == pytest.approx({"y": 1.0, "x": 1.0})
    assert S.holm({}) == {}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.holm({"x": 1.5})


def test_loyalty_hand_counts_and_wilson():
    unrouted = {"1": "Yes", "2": "red", "3": "2", "4": "no", "5": "circle"}
    routed = {"1": "yes.", "2": "blue", "3": "2", "4": "no", "5": "circle", "6": "extra"}
    est = S.loyalty(routed, unrouted)
    assert (est.value, est.n) == (4 / 5, 5)  # items 1 (normalised), 3, 4, 5 agree; item 6 has no unrouted answer
    # Wilson by hand for 4 of 5: p = .8, z^2 = 3.8415, centre = (.8 + .38415) / 1.76829 = .66967,
    # half = 1.95996 * sqrt(.032 + .038415) / 1.76829 = .29412
    assert est.low == pytest.approx(0.37553, abs=1e-4)
    assert est.high == pytest.approx(0.96378, abs=1e-4)
    all_agree = S.loyalty(unrouted, unrouted)
    assert all_agree.value == 1.0 and all_agree.high == 1.0 and all_agree.low < 0.6  # not a degenerate [1, 1]


def _synthetic(horizon_layer: int, layers=range(0, 12, 2), n=400, gap=0.4, seed=0):
    """Signals beat random by `gap` on every item before `horizon_layer` and equal it from there on."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(n)]
    signals, rnd = {"a": {}, "b": {}}, {}
    for layer in layers:
        base = rng.random(n) < 0.4
        lift = rng.random(n) < gap if layer < horizon_layer else np.zeros(n, bool)
        signals["a"][layer] = {i: float(x or l) for i, x, l in zip(ids, base, lift)}
        signals["b"][layer] = {i: float(x) for i, x in zip(ids, base)}  # never better than random
        rnd[layer] = [{i: float(x) for i, x in zip(ids, base)} for _ in range(5)]
    return signals, rnd


def test_horizon_by_interval_on_a_known_horizon():
    signals, rnd = _synthetic(6)
    h, rows = S.horizon_by_interval(signals, rnd, delta=0.05, samples=300)
    assert h == 6
    assert [r.layer for r in rows] == [0, 2, 4, 6, 8, 10]
    assert all(r.best == "a" for r in rows if r.layer < 6)
    assert all(r.difference.value > 0.2 for r in rows if r.layer < 6)
    # one noisy deep layer that beats random again breaks "every deeper layer"
    for i in list(signals["a"][10])[:150]:
        signals["a"][10][i] = 1.0
    h, _ = S.horizon_by_interval(signals, rnd, delta=0.05, samples=300)
    assert h is None


def test_horizon_best_signal_is_chosen_and_measured_on_different_halves():
    # seven signals that are coin flips against a random control worth 0.5 on every item (six seeds, half
    # right): the best of them chosen and measured on the same items is biased upward (the oracle below);
    # chosen on one half and measured on the other, best - random is centred on 0
    rng = np.random.default_rng(5)
    ids = [f"i{k}" for k in range(300)]
    rnd = {0: [{i: float(s % 2) for i in ids} for s in range(6)]}
    ours, same_half = [], []
    for trial in range(60):
        noise = {f"s{k}": {0: {i: float(rng.random() < 0.5) for i in ids}} for k in range(7)}
        _, rows = S.horizon_by_interval(noise, rnd, samples=20, seed=trial)
        ours.append(rows[0].difference.value)
        pick, _ = S.split_items(ids, trial)
        same_half.append(max(np.mean([by[0][i] for i in pick]) for by in noise.values()) - 0.5)
    assert np.mean(same_half) > 0.03
    assert abs(np.mean(ours)) < 0.015
    with pytest.raises(ValueError, match="5 seeds"):
        S.horizon_by_interval(noise, {0: rnd[0][:2]})


def test_split_items_is_a_seeded_partition():
    ids = [str(k) for k in range(11)]
    a, b = S.split_items(ids, seed=4)
    assert sorted(a + b) == sorted(ids) and not set(a) & set(b) and len(a) == 5
    assert S.split_items(ids, seed=4) == (a, b)


def test_chance_corrected_by_hand():
    rows = ([("existence", True, 0.5)] * 3 + [("existence", False, 0.5)]  # acc .75, chance .5 -> .5
            + [("counting", True, 0.25)] * 1 + [("counting", False, 0.25)] * 3  # acc .25, chance .25 -> 0
            + [("grounding", True, 0.0)] * 2 + [("grounding", False, 0.0)] * 3  # acc .4, chance 0 -> .4
            + [("blind_solvable", True, 0.0)] * 9)
    out = S.chance_corrected(rows)
    assert "blind_solvable" not in out.corrected
    assert out.corrected == pytest.approx({"existence": 0.5, "counting": 0.0, "grounding": 0.4})
    assert out.weighted == pytest.approx(0.3)
    w = S.chance_corrected(rows, weights={"existence": 2, "counting": 1, "grounding": 1})
    assert w.weighted == pytest.approx((2 * 0.5 + 0 + 0.4) / 4)
    with pytest.raises(ValueError, match="relation"):
        S.chance_corrected(rows, weights={"relation": 1})

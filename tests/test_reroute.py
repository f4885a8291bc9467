"""Reroute, faithful and fair: the presets' scoring layers against the Reroute reference code's configs, the
re-entry policies against slow references, per-stage actions and every policy against the masking oracle and the
schedule's per-layer counts, and the per-decision diagnostics against a recount from the record's selections."""

from __future__ import annotations

import math
import random

import pytest
import torch

from oracle import masked_forward, masked_run, text_positions
from visroute import RoutingConfig, Stage, apply_routing
from visroute.budget import REROUTE_PDROP_WEIGHTS, Shape, active_per_layer, schedule_avg_T, scale_layers, solve
from visroute.methods import get_method, method_config, parse_method_spec
from visroute.reentry import build_reentry, reentry_policies

# ---- the reference code's configs (elmma/mllm-reroute, configs/experiment/<model>/avg<T>/) -------------------------
# ours_vs_fastv: drop_layers, one keep ratio for all; ours_vs_pdrop: drop_layers, keep ratios [a, a, a/2, a/4].
# Every decision is scored with the decision layer's own attention (models/router.py, _capture_attention_weights).
REFERENCE_FASTV = {"llava": [3, 7, 15, 23], "qwen": [3, 6, 13, 20]}
REFERENCE_PDROP = {"llava": [2, 7, 15, 23], "qwen": [2, 6, 13, 20]}
REFERENCE_FASTV_RATIO = {64: 0.01916, 128: 0.1418, 192: 0.2644}
SHAPES = {"llava": (32, 576, "llava"), "qwen": (28, 576, "qwen2_5_vl")}


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("tier", [64, 128, 192])
def test_reroute_fastv_decides_and_scores_where_the_reference_does(model, tier):
    layers, visual, family = SHAPES[model]
    faithful = method_config(f"reroute-fastv@{tier}", layers, visual, family)
    assert [s.layer for s in faithful.stages] == REFERENCE_FASTV[model]
    # the first decision as FastV scores it (layer K-1); the re-selections at the decision layer itself
    assert [s.scoring_layer for s in faithful.stages] == [2] + REFERENCE_FASTV[model][1:]
    previous = method_config(f"reroute-fastv@{tier}:scoring=previous", layers, visual, family)
    assert [s.scoring_layer for s in previous.stages] == [l - 1 for l in REFERENCE_FASTV[model]]
    assert [s.keep for s in previous.stages] == [s.keep for s in faithful.stages]
    if model == "llava":  # the reference's ratio of 576 (ours is solved to the tier exactly: within one token)
        assert all(abs(s.keep - REFERENCE_FASTV_RATIO[tier] * 576) <= 1 for s in faithful.stages)
    base = method_config(f"fastv@{tier}", layers, visual, family)
    assert sum(active_per_layer(faithful, layers, visual)) == sum(active_per_layer(base, layers, visual))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("tier", [64, 128, 192])
def test_reroute_pdrop_is_unchanged_and_its_other_convention_scores_one_layer_earlier(model, tier):
    layers, visual, family = SHAPES[model]
    cfg = method_config(f"reroute-pdrop@{tier}", layers, visual, family)
    assert [s.layer for s in cfg.stages] == REFERENCE_PDROP[model]
    assert all(s.score_layer is None for s in cfg.stages)  # every decision at its own layer, as the reference
    assert "reentry" not in cfg.to_dict()  # the config dict (and so a stored run's identity) is as before
    solved = solve(Shape.weighted(scale_layers((2, 7, 15, 23), layers), REROUTE_PDROP_WEIGHTS), layers, visual,
                   schedule_avg_T(method_config(f"pdrop@{tier}", layers, visual, family), layers, visual))
    assert [s.keep for s in cfg.stages] == list(solved.keeps)
    a = cfg.stages[0].keep
    for s, w in zip(cfg.stages, REROUTE_PDROP_WEIGHTS):  # the reference's [a, a, a/2, a/4] shape
        assert abs(s.keep - w * a) <= 2
    previous = method_config(f"reroute-pdrop@{tier}:scoring=previous", layers, visual, family)
    assert [s.scoring_layer for s in previous.stages] == [REFERENCE_PDROP[model][0]] + [
        l - 1 for l in REFERENCE_PDROP[model][1:]]


@pytest.mark.parametrize("model", list(SHAPES))
def test_reroute_nuwa_prunes_its_first_stage_and_reroutes_the_second_among_the_survivors(model):
    layers, visual, family = SHAPES[model]
    for tier in (64, 128, 192):
        nuwa = method_config(f"nuwa@{tier}", layers, visual, family)
        rr = method_config(f"reroute-nuwa@{tier}", layers, visual, family)
        first, *later = rr.stages
        assert first.to_dict() == {**nuwa.stages[0].to_dict(), "action": "prune"}
        assert rr.stage_actions == ["prune"] + ["reroute"] * len(later) and len(later) == 4
        assert all(s.keep == nuwa.stages[1].keep for s in later)
        assert later[0].layer == nuwa.stages[1].layer and later[0].scoring_layer == nuwa.stages[1].scoring_layer
        assert all(s.scoring_layer == s.layer for s in later[1:])
        assert active_per_layer(rr, layers, visual) == active_per_layer(nuwa, layers, visual)
        old = method_config(f"reroute-nuwa-layer0@{tier}", layers, visual, family)
        assert old.stage_actions == ["reroute"] * 5 and active_per_layer(old, layers, visual) == active_per_layer(
            nuwa, layers, visual)


def test_method_options_are_parsed_and_checked():
    assert parse_method_spec("reroute-pdrop@24:reentry=quota:scoring=previous") == (
        "reroute-pdrop", 24, {"reentry": "quota", "scoring": "previous"})
    assert method_config("reroute-pdrop@128:reentry=hysteresis", 32, 576).reentry == "hysteresis"
    with pytest.raises(ValueError, match="scoring"):
        method_config("reroute-fastv@128:scoring=later", 32, 576)
    with pytest.raises(ValueError, match="Unknown re-entry policy"):
        method_config("reroute-fastv@128:reentry=nope", 32, 576)
    with pytest.raises(ValueError, match="Unknown option"):
        method_config("fastv@128:scoring=previous", 32, 576)  # a method without options
    with pytest.raises(ValueError, match="reroute stages"):
        RoutingConfig("prune", "random", [Stage(2, 4)], reentry="quota")
    with pytest.raises(ValueError, match="Unknown stage action"):
        Stage(2, 4, action="drop")


# ---- the policies against slow references ---------------------------------------------------------------------
def _ranked(scores: list[float], cands: list[int]) -> list[int]:
    return sorted(cands, key=lambda j: (-scores[j], j))


def _pct(scores: list[float], cands: list[int]) -> dict[int, float]:
    order = _ranked(scores, cands)
    n = len(order)
    return {j: 1.0 - r / max(n - 1, 1) for r, j in enumerate(order)}


def slow_reference(scores, cands, prev, k):
    return set(_ranked(scores, cands)[:k])


def slow_hysteresis(scores, cands, prev, k, margin):
    """Incumbents first; then a bypassed token swaps in for the weakest kept incumbent while its percentile beats
    that incumbent's by more than the margin."""
    p = _pct(scores, cands)
    inc = sorted([j for j in cands if j in prev], key=lambda j: (-p[j], j))
    chal = sorted([j for j in cands if j not in prev], key=lambda j: (-p[j], j))
    k = min(k, len(cands))
    kept_inc, kept_chal = inc[:k], chal[:max(0, k - len(inc))]
    rest = chal[len(kept_chal):]
    while rest and kept_inc and p[rest[0]] - margin > p[kept_inc[-1]]:
        kept_inc.pop()
        kept_chal.append(rest.pop(0))
    return set(kept_inc) | set(kept_chal)


def slow_quota(scores, cands, prev, k, share):
    quota, kept, taken = math.floor(share * k), [], 0
    for j in _ranked(scores, cands):
        if len(kept) == k:
            break
        if j in prev:
            kept.append(j)
        elif taken < quota:
            kept.append(j)
            taken += 1
    for j in _ranked(scores, cands):  # bypassed tokens over the quota only when incumbents run out
        if len(kept) < k and j not in kept:
            kept.append(j)
    return set(kept)


def _draw(rng, b=4, n=30):
    scores = torch.tensor([[rng.gauss(0, 1) for _ in range(n)] for _ in range(b)])
    cands = torch.tensor([[rng.random() < 0.8 for _ in range(n)] for _ in range(b)])
    prev = torch.tensor([[rng.random() < 0.4 for _ in range(n)] for _ in range(b)])
    keep = torch.tensor([rng.choice([0, 1, 5, 9, 14, 40]) for _ in range(b)])
    return scores, cands, prev, keep


def _as_sets(mask):
    return [set(row.nonzero().flatten().tolist()) for row in mask]


def _lists(scores, cands, prev, b):
    return (scores[b].tolist(), cands[b].nonzero().flatten().tolist(), set(prev[b].nonzero().flatten().tolist()))


@pytest.mark.parametrize("policy,options,slow", [
    ("reference", {}, slow_reference),
    ("hysteresis", {"margin": 0.13}, lambda *a: slow_hysteresis(*a, margin=0.13)),
    ("hysteresis", {"margin": 0.0}, slow_reference),
    ("quota", {"share": 0.34}, lambda *a: slow_quota(*a, share=0.34)),
    ("quota", {"share": 0.0}, lambda *a: slow_quota(*a, share=0.0)),
    ("quota", {"share": 1.0}, slow_reference),
])
def test_each_policy_selects_what_its_slow_reference_selects(policy, options, slow):
    rng = random.Random(7)
    pol = build_reentry(policy, options)
    for _ in range(40):
        scores, cands, prev, keep = _draw(rng)
        pol.begin_prefill()
        got = pol.select(scores, cands, prev, keep)
        for b in range(scores.shape[0]):
            s, c, p = _lists(scores, cands, prev, b)
            want = slow(s, c, p, int(keep[b]))
            assert _as_sets(got)[b] == want
            assert len(want) == min(int(keep[b]), len(c))  # exactly the schedule's count


def test_cumulative_ranks_by_a_running_mix_of_percentiles():
    rng = random.Random(3)
    pol = build_reentry("cumulative", {"alpha": 0.4})
    for _ in range(10):
        pol.begin_prefill()
        running: list[dict[int, float]] = [{} for _ in range(4)]
        cands = torch.tensor([[rng.random() < 0.8 for _ in range(30)] for _ in range(4)])
        for decision in range(3):
            scores, _, prev, keep = _draw(rng)
            got = _as_sets(pol.select(scores, cands, prev, keep))
            for b in range(4):
                s, c, _ = _lists(scores, cands, prev, b)
                p = _pct(s, c)
                for j in c:
                    running[b][j] = p[j] if decision == 0 else 0.4 * p[j] + 0.6 * running[b][j]
                want = set(sorted(c, key=lambda j: (-running[b][j], j))[:int(keep[b])])
                assert got[b] == want
            cands = cands & torch.tensor([[rng.random() < 0.9 for _ in range(30)] for _ in range(4)])


def test_every_registered_policy_is_covered_here():
    assert set(reentry_policies()) == {"reference", "hysteresis", "cumulative", "quota"}


# ---- the engine under each policy and per-stage action --------------------------------------------------------
POLICIES = [("reference", {}), ("hysteresis", {"margin": 0.2}), ("cumulative", {"alpha": 0.5}),
            ("quota", {"share": 0.25})]
MIXED = {
    "prune-then-reroute": ("reroute", [Stage(0, 0.7, action="prune", scorer="random"), Stage(2, 0.3),
                                       Stage(4, 0.3)]),
    "reroute-prune-reroute": ("prune", [Stage(1, 0.5, action="reroute"), Stage(2, 0.4),
                                        Stage(4, 0.3, action="reroute")]),
    "all-reroute": ("reroute", [Stage(1, 0.5), Stage(3, 0.25), Stage(4, 0.4)]),
}


def _route(model, inputs, cfg):
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs)
        return out, router.last_record


@pytest.mark.parametrize("schedule", list(MIXED))
@pytest.mark.parametrize("policy,options", POLICIES, ids=[p for p, _ in POLICIES])
def test_policies_and_stage_actions_keep_the_counts_and_equal_the_masking_oracle(fam, schedule, policy, options):
    model, inputs = fam.model, fam.batch()
    action, stages = MIXED[schedule]
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=stages, reentry=policy,
                        reentry_options=options)
    out, rec = _route(model, inputs, cfg)
    layers = model.config.get_text_config().num_hidden_layers
    for b in range(rec.batch_size):  # the schedule's per-layer counts (so avg_T, FLOPs and K/V) whatever the policy
        assert rec.active_visual[:, b].tolist() == active_per_layer(cfg, layers, int(rec.num_visual[b]))
    alive = torch.arange(rec.stages[0].active.shape[1])[None] < rec.num_visual[:, None]
    for i, st in enumerate(rec.stages):
        assert st.action == cfg.stage_actions[i]
        prev = alive if i == 0 else rec.stages[i - 1].active
        if st.action == "prune":
            assert not (st.active & ~prev).any()
            alive = st.active
        assert not (st.active & ~alive).any()  # never a token an earlier prune stage removed
    ref, _ = masked_forward(fam.eager, inputs, fam.image_token_id, [(s.layer, s.active) for s in rec.stages],
                            cfg.stage_actions)
    text = text_positions(inputs, fam.image_token_id)
    torch.testing.assert_close(out.logits[text], ref[text], atol=5e-5, rtol=1e-4)
    if schedule == "all-reroute":
        assert any(d.readmitted.sum() > 0 for d in rec.decisions())  # tokens do come back


@pytest.mark.parametrize("policy,options", POLICIES[1:], ids=[p for p, _ in POLICIES[1:]])
def test_the_engine_applies_the_policy_to_the_scores_it_records(fam, policy, options):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(1, 0.5), Stage(3, 0.25), Stage(4, 0.4)],
                        reentry=policy, reentry_options=options)
    _, rec = _route(model, inputs, cfg)
    slow = build_reentry(policy, options)
    slow.begin_prefill()
    prev = torch.arange(rec.stages[0].active.shape[1])[None] < rec.num_visual[:, None]
    for st in rec.stages:
        cands = torch.arange(st.active.shape[1])[None] < rec.num_visual[:, None]
        assert torch.equal(slow.select(st.scores, cands, prev, st.requested), st.active)
        prev = st.active
    plain = RoutingConfig("reroute", "last_token_attention", cfg.stages)
    _, base = _route(model, inputs, plain)
    assert any(not torch.equal(a.active, b.active) for a, b in zip(rec.stages, base.stages)), \
        "the policy changed nothing on this batch: the check above would not catch a policy that is ignored"


@pytest.mark.parametrize("policy,options", POLICIES, ids=[p for p, _ in POLICIES])
def test_keep_all_under_every_policy_equals_the_unmodified_model(fam, policy, options):
    model, inputs = fam.model, fam.batch()
    with torch.no_grad():
        ref = model(**inputs).logits
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(1, 1.0), Stage(3, 10_000)], reentry=policy,
                        reentry_options=options)
    out, _ = _route(model, inputs, cfg)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=2e-5, rtol=1e-5)


def test_a_stateful_policy_gives_a_padded_sample_what_it_gives_it_alone(fam):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(0, 0.5, action="prune"), Stage(2, 0.3),
                                                           Stage(4, 0.3)], reentry="cumulative")
    out, rec = _route(model, inputs, cfg)
    text = text_positions(inputs, fam.image_token_id)
    for i in range(3):
        alone = fam.single(i)
        out_i, rec_i = _route(model, alone, cfg)
        for st, st_i in zip(rec.stages, rec_i.stages):
            assert torch.equal(st.selected[i], st_i.selected[0])
        text_i = text_positions(alone, fam.image_token_id)[0]
        torch.testing.assert_close(out.logits[i][text[i]], out_i.logits[0][text_i], atol=5e-5, rtol=1e-4)


def test_cached_decoding_under_a_policy_and_stage_actions_equals_the_oracle(fam):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(0, 0.6, action="prune"), Stage(2, 0.3),
                                                           Stage(4, 0.3)], reentry="hysteresis")
    with apply_routing(model, cfg) as router, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        rec = router.last_record
    length = inputs["input_ids"].shape[1]
    generated = gen.sequences[:, length:]
    ref = masked_run(fam.eager, inputs, fam.image_token_id, [(s.layer, s.active) for s in rec.stages],
                     cfg.stage_actions, generated=generated[:, :-1])
    for t, produced in enumerate(gen.logits):
        torch.testing.assert_close(produced, ref.logits[:, length - 1 + t], atol=5e-5, rtol=1e-4)


# ---- diagnostics ------------------------------------------------------------------------------------------------
def _recount(layers, selections, num_visual, num_layers, relevant):
    """Per stage and sample, from the selected index lists alone: (evicted, readmitted, ages, relevant evicted,
    relevant readmitted)."""
    out = []
    for b, nv in enumerate(num_visual):
        last = {j: layers[0] for j in range(nv)}  # the layer up to which each token ran
        before = set(range(nv))
        rows = []
        for i, layer in enumerate(layers):
            cur = set(selections[i][b])
            ev, back = before - cur, cur - before
            rows.append((len(ev), len(back), sorted(layer - last[j] for j in back), len(ev & relevant[b]),
                         len(back & relevant[b])))
            end = layers[i + 1] if i + 1 < len(layers) else num_layers
            for j in cur:
                last[j] = end
            before = cur
        out.append(rows)
    return out


def test_the_diagnostics_equal_a_recount_from_the_selections(fam):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig("reroute", "random", [Stage(0, 0.7, action="prune"), Stage(1, 0.3), Stage(3, 0.3),
                                              Stage(5, 0.4)])
    _, rec = _route(model, inputs, cfg)
    rng = random.Random(1)
    nv = rec.num_visual.tolist()
    relevant = [set(rng.sample(range(n), n // 3)) for n in nv]
    relevance = [torch.tensor([1.0 if j in relevant[b] else 0.0 for j in range(n)]) for b, n in enumerate(nv)]
    decisions = rec.decisions(relevance)
    want = _recount([s.layer for s in rec.stages], [[sel.tolist() for sel in s.selected] for s in rec.stages], nv,
                    rec.num_layers, relevant)
    assert any(r[1] for rows in want for r in rows)  # something re-entered, with an age to check
    for i, d in enumerate(decisions):
        for b in range(rec.batch_size):
            got = (int(d.evicted[b]), int(d.readmitted[b]), sorted(d.ages[b]), int(d.relevant_evicted[b]),
                   int(d.relevant_readmitted[b]))
            assert got == want[b][i]


# ---- third-party policies -----------------------------------------------------------------------------------------
POLICY_PLUGIN = '''
from visroute.reentry import ReentryPolicy, select_top


class Incumbents(ReentryPolicy):
    """Only tokens that ran before may run again (a pruning cascade), scored as given."""

    name = "incumbents_only"
    description = "third-party test policy"

    def select(self, scores, candidates, previous, keep):
        return select_top(scores, candidates & previous, keep)
'''


def test_a_policy_published_through_the_entry_point_group_is_used_and_a_taken_name_refused(tmp_path, monkeypatch):
    import textwrap

    import visroute.reentry as reentry_module

    package = tmp_path / "visroute_plugin_policy"
    package.mkdir()
    (package / "__init__.py").write_text(POLICY_PLUGIN)
    info = tmp_path / "visroute_plugin_policy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: visroute_plugin_policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [visroute.reentry]
        incumbents_only = visroute_plugin_policy:Incumbents
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reentry_module.REENTRY, "entries", dict(reentry_module.REENTRY.entries))
    monkeypatch.setattr(reentry_module.REENTRY, "loaded", False)
    assert "incumbents_only" in reentry_policies()
    from tiny import llava_batch, tiny_llava

    model = tiny_llava()
    inputs = llava_batch(model, [[1, 5, 6, 7], [1, 8]], [1, 2])
    cfg = RoutingConfig("reroute", "random", [Stage(1, 6), Stage(3, 4)], reentry="incumbents_only")
    _, rec = _route(model, inputs, cfg)
    assert not (rec.stages[1].active & ~rec.stages[0].active).any()  # nothing bypassed came back
    with pytest.raises(ValueError, match="already registered"):
        reentry_module.register_reentry(type("Other", (reentry_module.ReentryPolicy,), {"name": "quota"}))

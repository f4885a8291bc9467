"""Routed training rows (`route_rows`): a share of the image rows has a random subset of its visual tokens stop
being read at a random layer, for good (prune) or until a later layer (reroute). Checked against the masking
oracle of docs/DESIGN.md (rules 2 and 3) run on each question alone, and for neutrality: the tokens are drawn
without regard to what they show, and both actions are trained alike."""

from __future__ import annotations

import copy
import json
import dataclasses

import pytest
import torch

from oracle import masked_run
from visroute.testbed import make_items
from visroute.testbed.modeling import BOS_ID, IMAGE_ID, build_model, build_processor, pixel_values, prompt
from visroute.testbed.train import (
    TrainConfig, _Tok, decoder_hidden, init_weights, make_batch, pack, projected_tokens, recipe_config,
    route_activity,
)

DEPTH = 8  # the "tiny" decoder


def shapes(active: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first layer with an inactive token, first layer after it with every token back (depth: never), kept
    count) of every routed row; raises if a row's pattern is not 'all, then one fixed subset, then all'."""
    out = []
    for row in active:
        off = [i for i in range(row.shape[0]) if not bool(row[i].all())]
        if not off:
            continue
        first, last = off[0], off[-1]
        assert off == list(range(first, last + 1)), "the inactive layers of a row are one span"
        assert all(torch.equal(row[i], row[first]) for i in off), "one subset through the span"
        out.append((first, last + 1, int(row[first].sum())))
    return out


def test_routing_draws_layers_shares_and_both_actions_as_configured():
    cfg = TrainConfig(route_rows=0.5, route_keep=(0.1, 0.4), reveal=0)
    spans = []
    routed = rows = 0
    for step in range(60):
        active = route_activity(cfg, step, 16, DEPTH)
        assert active is None or active.shape == (16, DEPTH, 144)
        assert active is None or torch.equal(active, route_activity(cfg, step, 16, DEPTH)), "seeded by the step"
        got = shapes(active) if active is not None else []
        routed += len(got)
        rows += 16
        spans += got
    assert 0.4 < routed / rows < 0.6
    for first, back, kept in spans:
        assert 1 <= first < DEPTH
        assert 0.1 * 144 - 1 <= kept <= 0.4 * 144
    pruned = [s for s in spans if s[1] == DEPTH]
    rerouted = [s for s in spans if s[1] < DEPTH]
    # half the rows reroute, except where the layer drawn is the last (nothing left to return to)
    assert 0.35 < len(rerouted) / len(spans) < 0.55 and pruned
    assert {s[0] for s in spans} == set(range(1, DEPTH))


def test_route_reroute_sets_which_action_the_routed_rows_take():
    def spans(share):
        cfg = TrainConfig(route_rows=1.0, route_reroute=share, reveal=0)
        return [s for step in range(20) for s in shapes(route_activity(cfg, step, 8, DEPTH))]

    only_reroute, only_prune = spans(1.0), spans(0.0)
    # every row routed before the last layer returns; a row routed at the last layer has no later layer to reach
    assert all(back < DEPTH for first, back, _ in only_reroute if first < DEPTH - 1)
    assert all(back == DEPTH for _, back, _ in only_prune)
    assert len(only_reroute) == len(only_prune) == 160
    with pytest.raises(ValueError, match="route_reroute"):
        TrainConfig(route_reroute=1.5)


def test_routing_at_input_drops_tokens_from_the_first_layer_for_good_and_spares_every_object():
    objects = [[[0, 1, 12, 13], [50], [100, 101]], [[7], [30, 31]]] * 4  # the tokens each object of a row shows
    spans, spared = [], 0
    for spare in (False, True):
        cfg = TrainConfig(route_rows=1.0, route_keep=(0.1, 0.3), route_at_input=True, route_spare_objects=spare,
                          route_reroute=1.0, reveal=0)
        for step in range(30):
            active = route_activity(cfg, step, len(objects), DEPTH, objects if spare else None)
            got = shapes(active)
            spans += got
            kept = active[:, 0]  # the same set through every layer
            assert torch.equal(active, kept[:, None].expand_as(active))
            vanished = sum(not bool(kept[r, toks].any()) for r, row in enumerate(objects) for toks in row)
            if spare:
                assert vanished == 0
            else:
                spared += vanished
    assert all(first == 0 and back == DEPTH for first, back, _ in spans)  # from the input on, never back
    assert spared > 0  # without sparing, objects do vanish at these shares
    with pytest.raises(ValueError, match="route_spare_objects"):
        route_activity(TrainConfig(route_rows=1.0, route_spare_objects=True, reveal=0), 0, 2, DEPTH)


def test_routing_is_off_by_default_before_the_reveal_and_in_older_recipes():
    assert TrainConfig().route_rows == 0 and recipe_config("v3").route_rows == 0
    cfg = TrainConfig(route_rows=1.0, reveal=400)
    assert route_activity(cfg, 399, 4, DEPTH) is None
    assert route_activity(cfg, 400, 4, DEPTH) is not None
    assert route_activity(TrainConfig(), 5000, 4, DEPTH) is None


def test_routing_leaves_the_rest_of_the_batch_as_it_was_and_ignores_what_tokens_show():
    tok = _Tok()
    base = recipe_config("v3", symbolic_steps=50, images=6, per_image=2)
    routed = dataclasses.replace(base, route_rows=1.0)
    on_object = on_background = kept_object = kept_background = 0
    for step in (450, 451, 452, 453):  # after the reveal
        a, b = make_batch(base, step, tok), make_batch(routed, step, tok)
        assert a["image"].active is None and b["image"].active is not None
        for name in a:
            for x, y in zip(a[name][:5], b[name][:5]):
                assert torch.equal(x, y)
        labels = b["image"].labels[..., 0] != 0  # patches showing an object
        for row, span in zip(b["image"].active, labels):
            off = [i for i in range(row.shape[0]) if not bool(row[i].all())]
            kept = row[off[0]]
            on_object += int(span.sum())
            on_background += int((~span).sum())
            kept_object += int((kept & span).sum())
            kept_background += int((kept & ~span).sum())
    # the kept share is the same on object and background patches (uniform draws: within sampling noise)
    assert abs(kept_object / on_object - kept_background / on_background) < 0.08


@pytest.mark.parametrize("action", ["prune", "reroute", "input"])
def test_routed_rows_compute_each_question_as_the_masking_oracle_of_the_engine(action):
    """Two questions packed after one image, routed at layer 3 keeping a random subset (reroute: back at layer
    6; input: pruned before the decoder, route_at_input): each question's logits equal the masking oracle's on
    that question alone."""
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    init_weights(model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    processor = build_processor()
    tok = _Tok()
    items = make_items(2, seed=4)
    image = items[0].image()
    prefix = [BOS_ID] + tok.user + [IMAGE_ID] * 144
    rows = pack([prefix], [[(*tok.block(it.question, it.answer), it.family) for it in items]])
    kept = torch.zeros(144, dtype=torch.bool)
    kept[torch.randperm(144, generator=torch.Generator().manual_seed(1))[:20]] = True
    active = torch.ones(1, DEPTH, 144, dtype=torch.bool)
    back = 6 if action == "reroute" else DEPTH
    first = 0 if action == "input" else 3
    active[0, first:back] = kept
    with torch.no_grad():
        visual = projected_tokens(model, pixel_values([image]))
        packed = model.lm_head(decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual, active=active))[0]
        plain = model.lm_head(decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual))[0]
    stages = [(first, kept[None])] + ([(6, torch.ones(1, 144, dtype=torch.bool))] if action == "reroute" else [])
    for k, it in enumerate(items, start=1):
        alone = processor(images=[image], text=[prompt(it.question) + " " + it.answer], return_tensors="pt")
        ref = masked_run(eager, alone, IMAGE_ID, stages, "reroute" if action == "reroute" else "prune"
                         ).logits[0, len(prefix):]
        mine = packed[rows.blk[0] == k][:-1]  # the block also holds the closing </s>
        assert torch.allclose(mine, ref, atol=1e-4)
        assert not torch.allclose(plain[rows.blk[0] == k][:-1], ref, atol=1e-3), "routing changed nothing"


def test_routed_training_resumes_to_the_same_weights_and_differs_from_unrouted(tmp_path):
    """Routing is drawn from (seed, step) alone, so a resumed routed run ends where a straight one does; and it
    reaches the weights (the same run unrouted ends elsewhere)."""
    from safetensors.torch import load_file

    from visroute.testbed.train import train

    def cfg(out, route_rows=1.0):
        return TrainConfig(out=str(out), symbolic_steps=3, deepen_steps=0, grow_from=0, tower_steps=1,
                           joint_steps=2, images=2, text_rows=1, text_questions=3, size="tiny", warmup=1,
                           reveal=0, route_rows=route_rows, eval_every=0, save_every=10, log_every=1, threads=1)

    straight = train(cfg(tmp_path / "a"), progress=False)
    assert train(cfg(tmp_path / "b"), progress=False, stop_at=2) is None
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False)
    unrouted = train(cfg(tmp_path / "c", route_rows=0.0), progress=False)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (straight, resumed, unrouted))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_finished_run_continues_into_its_then_route_recipe_exactly(tmp_path):
    """Phase 4 (routed) changes nothing before it: the base recipe's finished state, resumed with routed steps
    added, ends where a run with them from the start ends; a state that routed earlier does not continue."""
    from safetensors.torch import load_file

    from visroute.testbed.train import continues, train

    def cfg(out, routed_steps=0, **kw):
        return TrainConfig(out=str(out), symbolic_steps=2, deepen_steps=0, grow_from=0, tower_steps=1,
                           joint_steps=1, routed_steps=routed_steps, images=2, text_rows=1, text_questions=3,
                           size="tiny", warmup=1, reveal=0, eval_every=0, save_every=10, log_every=1, threads=1,
                           **({"route_rows": 1.0, "route_phases": ("routed",)} if routed_steps else {}), **kw)

    straight = train(cfg(tmp_path / "a", routed_steps=2), progress=False)
    train(cfg(tmp_path / "b"), progress=False)  # the base recipe, finished at step 4
    continued = train(cfg(tmp_path / "b", routed_steps=2), resume=True, progress=False)
    wa, wb = load_file(straight / "model.safetensors"), load_file(continued / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["symbolic"] * 2 + ["tower", "joint", "routed", "routed"]
    base = dataclasses.asdict(cfg(tmp_path / "b"))
    assert continues(base, cfg(tmp_path / "b", routed_steps=2), 4)
    assert not continues(base, cfg(tmp_path / "b", routed_steps=2), 5)  # past phase 3: not a state of that run
    early = dataclasses.asdict(cfg(tmp_path / "b", route_rows=0.5))  # routed from the reveal on
    assert not continues(early, cfg(tmp_path / "b", routed_steps=2), 4)
    assert not continues(base, cfg(tmp_path / "b", routed_steps=2, seed=1), 4)


def test_a_finished_v3_run_continues_into_v3_then_drop():
    from dataclasses import asdict

    from visroute.testbed.train import continues

    base, drop = recipe_config("v3"), recipe_config("v3-then-drop")
    assert drop.route_at_input and drop.route_spare_objects and drop.routed_steps > 0
    assert drop.steps == base.steps + drop.routed_steps
    assert continues(asdict(base), drop, base.steps)
    assert not continues(asdict(base), drop, base.steps + 1)


@pytest.mark.parametrize("name, base", [("v3-drop", "v3"), ("v3-grow-drop", "v3-grow")])
def test_drop_throughout_drops_at_the_input_in_every_decoder_phase_from_the_reveal(name, base):
    from dataclasses import asdict

    from visroute.testbed.train import continues

    cfg, then_drop = recipe_config(name), recipe_config(f"{base}-then-drop")
    assert cfg.steps == recipe_config(base).steps  # no phase added
    for key in ("route_rows", "route_keep", "route_at_input", "route_spare_objects"):
        assert getattr(cfg, key) == getattr(then_drop, key)
    objects = [[[5], [60, 61]]] * 16
    starts = {}
    for step in range(cfg.steps):
        phase, d, _ = cfg.phase(step)
        if phase in starts or (phase == "symbolic" and d < cfg.reveal - 1):
            continue
        active = route_activity(cfg, step, 16, DEPTH, objects)
        if phase == "symbolic" and d == cfg.reveal - 1:
            assert active is None  # the last step before the reveal ends
            continue
        starts[phase] = active is not None and {(first, back) for first, back, _ in shapes(active)} == {(0, DEPTH)}
    assert starts == {"symbolic": True, "tower": False, "joint": True, **({"deepen": True} if cfg.deepen_steps else {})}
    assert not continues(asdict(recipe_config(base)), cfg, cfg.symbolic_steps)  # routed from the reveal on


@pytest.mark.parametrize("name, base, first", [("v3-late-drop", "v3", 5500), ("v3-grow-late-drop", "v3-grow", 5000)])
def test_late_drop_drops_at_the_input_from_its_first_step_on_and_continues_a_base_state_from_before(name, base, first):
    from dataclasses import asdict

    from visroute.testbed.train import continues, first_routed_step

    cfg, drop = recipe_config(name), recipe_config(f"{base}-drop")
    assert cfg.steps == recipe_config(base).steps  # no phase added
    for key in ("route_rows", "route_keep", "route_at_input", "route_spare_objects"):
        assert getattr(cfg, key) == getattr(drop, key)
    assert first_routed_step(asdict(cfg)) == first
    objects = [[[5], [60, 61]]] * 16
    assert route_activity(cfg, first - 1, 16, DEPTH, objects) is None
    routed = [step for step in (first, cfg.steps - 1) if route_activity(cfg, step, 16, DEPTH, objects) is not None]
    assert routed == [first, cfg.steps - 1] and cfg.phase(cfg.steps - 1)[0] == "joint"
    assert continues(asdict(recipe_config(base)), cfg, first)
    assert not continues(asdict(recipe_config(base)), cfg, first + 1)


def test_a_routed_state_continues_only_into_a_run_that_routed_every_earlier_step_alike():
    from dataclasses import asdict

    from visroute.testbed.train import continues

    drop = TrainConfig(route_rows=0.5, route_at_input=True, reveal=10, symbolic_steps=100, deepen_steps=0,
                       tower_steps=10, joint_steps=20)
    whole_after = dataclasses.replace(drop, routed_steps=30, route_phases=("symbolic", "deepen", "joint"))
    saved = asdict(drop)
    assert continues(saved, whole_after, drop.steps)  # phase 4 routes nothing; every earlier step alike
    assert not continues(saved, whole_after, drop.steps + 1)  # a state inside phase 4
    assert not continues(saved, dataclasses.replace(whole_after, route_keep=(0.2, 0.9)), drop.steps)
    assert not continues(saved, dataclasses.replace(whole_after, route_phases=("symbolic", "deepen")), drop.steps)
    assert continues(saved, dataclasses.replace(whole_after, route_phases=("symbolic", "deepen")), 110)
    assert not continues(saved, dataclasses.replace(whole_after, route_start=50), 50 + 1)
    assert continues(saved, dataclasses.replace(whole_after, route_start=50), 10)  # before either routed


def test_route_start_delays_routing_and_a_state_from_before_it_continues_into_it():
    from dataclasses import asdict

    from visroute.testbed.train import continues, first_routed_step

    late = TrainConfig(route_rows=1.0, reveal=10, route_start=50)
    assert route_activity(late, 49, 4, DEPTH) is None and route_activity(late, 50, 4, DEPTH) is not None
    assert first_routed_step(asdict(late)) == 50
    assert first_routed_step(asdict(TrainConfig(route_rows=1.0, reveal=10))) == 10  # the reveal
    assert first_routed_step(asdict(TrainConfig(route_rows=1.0, route_phases=("joint",)))) == 6000 + 1500 + 400
    assert first_routed_step(asdict(TrainConfig())) == float("inf")
    base = asdict(TrainConfig(reveal=10))
    assert continues(base, late, 50) and not continues(base, late, 51)
    assert not continues(base, dataclasses.replace(late, seed=1), 50)

"""Seeded random schedules (1-4 stages at random layers; keeps that are int counts or float fractions, 0 and
more than the visual tokens among them) on random padded batches (1-3 samples of random lengths, 0-2 images
each; Qwen images of random sizes), by a random registered scorer, both actions, each checked against the
masking oracle (docs/DESIGN.md rules 2 and 3): the routed model's text-token logits equal those of the eager
model run with explicit masks from the routed prefill's selections."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from conftest import EVERY, family
from oracle import masked_run, text_positions
from visroute import RoutingConfig, Stage, apply_routing
from visroute.scoring import available_scorers

SCHEDULES = 48
FRACTIONS = (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0)  # a float keep above 1 is an error (Stage)
TEXT_IDS = range(3, 99)  # clear of padding, the image tokens and Qwen's vision markers


def _keep(rng: random.Random) -> int | float:
    kind = rng.randrange(6)
    if kind == 0:
        return 0
    if kind == 1:
        return rng.choice((40, 1000))  # more than any sample's visual tokens
    if kind == 2:
        return rng.randint(1, 12)
    if kind == 3:
        return round(rng.random(), 3)
    return rng.choice(FRACTIONS)


def draw(seed: int):
    """(family name, stages, prompts, images, scorer) of random case `seed`."""
    rng = random.Random(seed)
    name = EVERY[seed % len(EVERY)]
    row = family(name).row
    layers = sorted(rng.sample(range(family(name).model.config.text_config.num_hidden_layers), rng.randint(1, 4)))
    stages = [Stage(layer, _keep(rng)) for layer in layers]
    size = rng.randint(1, 3)
    prompts = [[1] + [rng.choice(TEXT_IDS) for _ in range(rng.randint(0, 7))] for _ in range(size)]
    images = [[row.draw_image(rng) for _ in range(rng.randint(0, 2))] for _ in range(size)]
    if not any(images):
        images[rng.randrange(size)].append(row.draw_image(rng))
    scorers = [n for n, cls in available_scorers().items() if set(cls.call_inputs) <= {"relevance"}]
    return name, stages, prompts, images, rng.choice(scorers)


def _expected_keep(keep: int | float, n: int) -> int:
    # the fraction as written (its decimal repr), floored exactly
    return keep if isinstance(keep, int) else math.floor(Fraction(repr(keep)) * n)


@pytest.mark.parametrize("seed", range(SCHEDULES))
def test_random_schedule_equals_the_masking_oracle(seed):
    name, stages, prompts, images, scorer = draw(seed)
    fam = family(name)
    inputs = fam.row.batch(fam.model, prompts, images, seed=seed)
    counts = inputs["input_ids"].eq(fam.image_token_id).sum(1).tolist()
    g = torch.Generator().manual_seed(seed)
    extras = {"relevance": [torch.rand(n, generator=g) for n in counts]}
    text = text_positions(inputs, fam.image_token_id)
    real = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
    for action in ("prune", "reroute"):
        cfg = RoutingConfig(action=action, scorer=scorer, stages=stages)
        with apply_routing(fam.model, cfg) as router, router.call_options(**extras), torch.no_grad():
            logits = fam.model(**inputs).logits
        rec = router.last_record
        candidates = real
        for stage, st in zip(stages, rec.stages):
            assert not (st.active & ~candidates).any()
            want = [min(_expected_keep(stage.keep, n), int(c)) for n, c in zip(counts, candidates.sum(1))]
            assert st.kept.tolist() == want, (stage, counts)
            candidates = st.active if action == "prune" else real
        decisions = [(st.layer, st.active) for st in rec.stages]
        ref = masked_run(fam.eager, inputs, fam.image_token_id, decisions, action).logits
        torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4, msg=lambda m: f"{action}: {m}")


def test_the_draws_cover_what_they_should():
    cases = [draw(seed) for seed in range(SCHEDULES)]
    keeps = [st.keep for _, stages, *_ in cases for st in stages]
    assert {len(stages) for _, stages, *_ in cases} == {1, 2, 3, 4}
    assert {name for name, *_ in cases} == set(EVERY)
    assert 0 in keeps and 0.0 in keeps and any(isinstance(k, int) and k >= 40 for k in keeps)
    assert any(isinstance(k, float) and 0 < k < 1 for k in keeps) and 1.0 in keeps
    assert any(st.layer == 0 for _, stages, *_ in cases for st in stages)
    assert {len(prompts) for _, _, prompts, _, _ in cases} == {1, 2, 3}
    assert any(not sample for _, _, _, images, _ in cases for sample in images)  # a sample without an image
    assert len({scorer for *_, scorer in cases}) >= 6


def test_the_oracle_sees_a_wrong_selection():
    """The comparison can fail: the routed logits disagree with the oracle of other selections."""
    fam = family("llava")
    inputs = fam.batch()
    cfg = RoutingConfig(action="prune", scorer="random", stages=[Stage(1, 0.5), Stage(4, 3)])
    with apply_routing(fam.model, cfg) as router, torch.no_grad():
        logits = fam.model(**inputs).logits
    text = text_positions(inputs, fam.image_token_id)
    for s in range(2):
        decisions = [(st.layer, st.active) for st in router.last_record.stages]
        layer, active = decisions[s]
        decisions[s] = (layer, active & active.roll(1, dims=1))  # one stage drops a few more tokens
        ref = masked_run(fam.eager, inputs, fam.image_token_id, decisions, "prune").logits
        assert (ref[text] - logits[text]).abs().max() > 1e-3

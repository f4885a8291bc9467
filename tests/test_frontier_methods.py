"""VisPruner, CDPruner, HoloV and SCOPE as named methods on every family of the family table: each keeps exactly
its tier's count per sample before the decoder (the first decoder layer runs only the kept tokens), so the routed
avg_T is the solved one; and the methods' configs at LLaVA-1.5's tiers."""

from __future__ import annotations

import pytest
import torch

from conftest import EVERY, family
from visroute import apply_routing
from visroute.budget import TIERS, schedule_avg_T
from visroute.methods import METHODS, method_config

NAMES = ["vispruner", "cdpruner", "holov", "scope"]


def test_the_frontier_methods_are_registered_and_prune_once_before_the_decoder():
    for name in NAMES:
        assert name in METHODS
        for tier in TIERS:
            cfg = method_config(f"{name}@{tier}", 32, 576, "llava")
            assert cfg.action == "prune" and cfg.scorer == name
            assert [(s.layer, s.keep) for s in cfg.stages] == [(0, tier)]
            assert schedule_avg_T(cfg, 32, 576) == tier
    assert method_config("vispruner@64", 32, 576).scorer_options == {"important_ratio": 0.5}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fam_name", EVERY)
def test_each_method_keeps_its_tier_on_every_family(fam_name, name):
    fam = family(fam_name)
    inputs = fam.batch()
    counts = inputs["input_ids"].eq(fam.image_token_id).sum(1)
    tier = max(1, int(counts.min()) // 3)
    layers = fam.model.config.get_text_config().num_hidden_layers
    cfg = method_config(f"{name}@{tier}", layers, int(counts.min()), fam_name)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("length", (args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = fam.model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with apply_routing(fam.model, cfg) as router, torch.no_grad():
            fam.model(**inputs, **fam.row.padded_positions(inputs))
    finally:
        hook.remove()
    rec = router.last_record
    kept = [int(rec.stages[0].selected[b].numel()) for b in range(len(counts))]
    assert kept == [tier] * len(counts)
    text = (inputs["attention_mask"].bool() & ~inputs["input_ids"].eq(fam.image_token_id)).sum(1)
    assert seen["length"] == int((text + tier).max())  # layer 0 runs the kept tokens only

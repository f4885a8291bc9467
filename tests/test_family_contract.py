"""The family contract: every registered family has a row in the tiny family table (a family registered without
one fails here), the vision-tower hooks are declared on the adapter base (a family that lacks one says which),
and the one Nüwa-variant fact per family is what both Nüwa paths read (the `nuwa` merge on a hand-written stage
and the `nuwa` method)."""

from __future__ import annotations

import pytest
import torch

from conftest import EVERY, family
from visroute.families import adapter_for, families
from visroute.families.base import FamilyAdapter
from visroute.methods import nuwa_plan
from visroute.scoring.nuwa import VARIANTS, NuwaMerge, family_variant

HOOKS = ("hook_vision_scores", "hook_vision_features", "hook_vision_keys", "hook_projector_input", "project_visual",
         "image_token_id")


def test_every_registered_family_has_a_row_in_the_family_table():
    covered = {adapter_for(family(name).model).name for name in EVERY}
    assert set(families()) <= covered, f"families without a tiny row: {sorted(set(families()) - covered)}"


def test_the_tower_hooks_are_declared_and_a_missing_one_names_itself():
    class Bare(FamilyAdapter):
        name = "bare"

    bare = object.__new__(Bare)
    for hook in HOOKS:
        assert hasattr(FamilyAdapter, hook) and not Bare.provides(hook)
    for call in (lambda: bare.hook_vision_features(0, 1, print), lambda: bare.hook_vision_keys(None, print),
                 lambda: bare.project_visual(torch.zeros(1)), lambda: bare.image_token_id):
        with pytest.raises(NotImplementedError, match="Bare does not"):
            call()
    assert bare.hook_projector_input(print) is None  # no projector input: tower-space users fall back
    for cls in families().values():
        assert cls.provides("hook_vision_scores") and cls.provides("image_token_id")


@pytest.mark.parametrize("name", EVERY)
def test_both_nuwa_paths_read_the_familys_variant(name):
    fam = family(name)
    adapter = adapter_for(fam.model)
    variant = adapter.nuwa_variant
    assert family_variant(adapter.name) == variant
    assert nuwa_plan(64, 28, 576, adapter.name).variant == variant
    merge = NuwaMerge()  # what a hand-written Stage(0, k, scorer="nuwa", merge="nuwa") attaches
    merge.attach(adapter)
    try:
        assert merge.constants == VARIANTS[variant]
    finally:
        merge.detach()


def test_qwen_families_get_the_qwen_variant_and_the_rest_llava():
    assert {n for n, cls in families().items() if cls.nuwa_variant == "qwen"} == {
        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}
    assert family_variant(None) == family_variant("no-such-family") == "llava"

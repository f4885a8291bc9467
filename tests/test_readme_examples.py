"""The README's "Writing a scorer" and "Adding a model family" examples run as written, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from visroute import apply_routing
from visroute.families import _FAMILIES, adapter_for
from visroute.scoring import _REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.fixture
def registries():
    scorers, families = dict(_REGISTRY), dict(_FAMILIES)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(scorers)
    _FAMILIES.clear()
    _FAMILIES.update(families)


def test_the_scorer_example_registers_and_routes(registries):
    from tiny import llava_batch, tiny_llava

    namespace: dict = {}
    exec(compile(example("### Writing a scorer"), "README", "exec"), namespace)
    cfg = namespace["cfg"]
    model = tiny_llava()
    inputs = llava_batch(model, [[1, 5, 6], [1, 7, 8, 9]], [1, 1])
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    stage = router.last_record.stages[0]
    # the kept tokens are those with the largest 1-norm of their hidden state entering layer 2
    seen = {}
    hook = model.model.language_model.layers[2].register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    for b in range(2):
        positions = inputs["input_ids"][b].eq(100).nonzero().flatten()
        norms = seen["h"][b, positions].float().norm(p=1, dim=-1)
        assert set(stage.selected[b].tolist()) == set(norms.topk(len(positions) // 2).indices.tolist())
    with pytest.raises(ValueError, match="Option 'p' of scorer 'hidden_norm' must be float"):
        type(cfg)("prune", "hidden_norm", [], scorer_options={"p": "one"})


def test_the_family_example_serves_its_class(registries):
    from transformers import LlavaForConditionalGeneration

    from tiny import tiny_llava

    namespace: dict = {}
    exec(compile(example("## Adding a model family"), "README", "exec"), namespace)

    class MyLlavaForConditionalGeneration(LlavaForConditionalGeneration):
        pass

    base = tiny_llava()
    model = MyLlavaForConditionalGeneration(base.config).eval()
    adapter = adapter_for(model)
    assert type(adapter).__name__ == "MyLlava" and adapter.box_frame == "scale_1000"
    assert type(adapter_for(base)).__name__ == "LlavaAdapter"
    with pytest.raises(ValueError, match="already registered"):
        namespace["register_family"](type("Again", (namespace["MyLlava"],), {}))

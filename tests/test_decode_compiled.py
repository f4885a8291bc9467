"""The fixed-shape decode step under `torch.compile` (`Router.compile_decode`): captured whole (fullgraph: no graph
break, so no host synchronisation), one graph for every step of a generation (fixed shapes), and the same logits
as the eager routed decode. Small models keep compile time low: inductor on a 2-layer LLaVA; dynamo's capture
with the eager backend for both rotary kinds (LLaVA, Qwen2.5-VL), beams, several-token calls and a cache that
grows."""

import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import PROMPTS
from tiny import FAMILIES
from visroute import RoutingConfig, Stage, apply_routing


def small(name, layers):
    row = FAMILIES[name]
    model = row.build(layers=layers)
    return row, model, row.batch(model, PROMPTS)


def generate(model, inputs, steps, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, return_dict_in_generate=True,
                              output_logits=True, **{"do_sample": False, **kw})


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def test_inductor_compiled_decode_equals_the_eager_decode():
    _, model, inputs = small("llava", 2)
    cfg = RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(1, 0.5)])
    with apply_routing(model, cfg) as router:
        eager = generate(model, inputs, 6, cache_implementation="static")
        torch._dynamo.reset()
        counters.clear()
        router.compile_decode()  # inductor, fullgraph=True
        compiled = generate(model, inputs, 6, cache_implementation="static")
        assert counters["stats"]["unique_graphs"] == 1  # 5 decode steps, one graph: fixed shapes
        again = generate(model, inputs, 6, cache_implementation="static")  # a new cache of the same shapes
        assert counters["stats"]["unique_graphs"] == 1
        router.compile_decode(False)
        back = generate(model, inputs, 6, cache_implementation="static")
    assert_same(compiled, eager)
    assert_same(again, eager)
    assert_same(back, eager, atol=0)
    assert router.last_record.kv_tokens[1].max() < router.last_record.kv_tokens[0].max()  # really routed


def test_the_readme_decoding_example_runs_and_agrees():
    """The README's decoding example, on the same small model (inductor finds the graph it compiled above)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## Decoding: the routed K/V cache")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    _, model, inputs = small("llava", 2)
    namespace = {"model": model, "inputs": inputs,
                 "cfg": RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(1, 0.5)])}
    with torch.no_grad():
        exec(compile(block, "README", "exec"), namespace)
    static, given, compiled, cache = (namespace[k] for k in ("static", "given", "compiled", "cache"))
    assert torch.equal(given, static) and torch.equal(compiled, static)
    assert cache.get_seq_length() == static.shape[1] - 1  # the caller's cache holds what was decoded
    assert cache.layers[1].keys.shape[2] < cache.layers[0].keys.shape[2]  # ... routed


@pytest.mark.parametrize("name", ["llava", "qwen2.5"])  # 1-D RoPE and M-RoPE; the step is the same otherwise
def test_compiled_decode_captures_both_rotary_kinds(name):
    """dynamo captures the step whole (fullgraph) for a family of each rotary kind; with re-entering tokens
    (reroute), beams and a padded batch, its decode equals the eager one."""
    _, model, inputs = small(name, 3)
    cfg = RoutingConfig(action="reroute", scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(2, 0.25)])
    with apply_routing(model, cfg) as router:
        eager = generate(model, inputs, 5, cache_implementation="static")
        eager_beams = generate(model, inputs, 4, num_beams=2)
        torch._dynamo.reset()
        counters.clear()
        router.compile_decode(backend="eager")
        compiled = generate(model, inputs, 5, cache_implementation="static")
        graphs = counters["stats"]["unique_graphs"]
        compiled_beams = generate(model, inputs, 4, num_beams=2)
    assert graphs == 1
    assert_same(compiled, eager)
    assert_same(compiled_beams, eager_beams)
    stages = router.last_record.stages
    assert (stages[1].active & ~stages[0].active).any()  # a bypassed token re-entered


def test_compiled_decode_of_a_growing_cache_and_of_several_tokens():
    """A plain forward's cache (no room) grows under the compiled step (a new capacity, a new graph), and a call of
    several tokens is causal among them: the same logits as the eager step."""
    row, model, inputs = small("llava", 3)
    cfg = RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(1, 0.5)])
    new = torch.tensor([[7, 8, 9, 10], [13, 14, 15, 16], [19, 20, 21, 22]])

    def run(router, compiled):
        router.compile_decode(compiled, backend="eager")
        with torch.no_grad():
            out = model(**inputs, use_cache=True, **row.padded_positions(inputs))
            cache, logits, fed, mask = out.past_key_values, [], 0, inputs["attention_mask"]
            for q in (3, 1) + (1,) * 18:
                token = new[:, fed:fed + q] if fed + q <= 4 else logits[-1][:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                position = (mask.cumsum(1) - 1)[:, -q:]
                logits.append(model(input_ids=token, attention_mask=mask, position_ids=position,
                                    past_key_values=cache, use_cache=True).logits)
                fed += q
        return torch.cat(logits, 1), cache.layers[0].keys.shape[2] - cache.layers[0].offset

    with apply_routing(model, cfg) as router:
        eager, room = run(router, False)
        torch._dynamo.reset()
        counters.clear()
        compiled, _ = run(router, True)
    assert room == 32  # grown twice: 16, then 32
    assert counters["stats"]["unique_graphs"] == 3  # 3 tokens / room 16, 1 token / room 16, 1 token / room 32
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)

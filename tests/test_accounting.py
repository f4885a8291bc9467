"""Executed FLOPs against torch's FlopCounterMode, formula TFLOPs, K/V bytes against the real cache tensors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiny import FAMILIES, llava_batch
from visroute import RoutingConfig, Stage, apply_routing
from visroute.accounting import (
    DecoderDims,
    account,
    cache_kv_bytes,
    executed_flops,
    formula_tflops,
    record_kv_bytes,
    unrouted_kv_bytes,
    unrouted_record,
)
from visroute.budget import schedule_avg_T

KEEP_ALL = RoutingConfig("prune", "last_token_attention", [])

CASES = list(FAMILIES)  # every row of the family table
_MODELS = {}


def case(name):
    """The family's tiny model with eager attention, which runs attention as matmuls that FlopCounterMode counts
    (it counts none for CPU SDPA), and one prompt holding the images of the table's second sample (LLaVA: two
    images; Qwen: two of different sizes)."""
    if name not in _MODELS:
        row = FAMILIES[name]
        model = row.build(attn="eager")
        _MODELS[name] = (model, row.batch(model, [[1, 5, 6, 7, 8]], [row.images[1]]))
    return _MODELS[name]


def counted(model, inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CASES)
def test_unrouted_flops_match_flop_counter(name):
    model, inputs = case(name)
    with apply_routing(model, KEEP_ALL) as router, torch.no_grad():
        model(**inputs)
        record = router.last_record
    independent = counted(model, inputs)  # the unrouted model, router removed
    ours = executed_flops(record, model, logits_tokens=None, causal=False)
    assert ours.total == pytest.approx(independent, rel=0.02)
    assert ours.vision > 0 and ours.projector > 0 and ours.scorer == 0


@pytest.mark.parametrize("name", ["llava", "qwen2.5"])
@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_routed_flops_match_flop_counter(name, action):
    model, inputs = case(name)
    cfg = RoutingConfig(action, "last_token_attention", [Stage(1, 8), Stage(3, 4), Stage(4, 6)])
    with apply_routing(model, cfg, measure_scorer_flops=True) as router, torch.no_grad():
        model(**inputs)
        record = router.last_record
        router.measure_scorer_flops = False
        independent = counted(model, inputs)
    ours = executed_flops(record, model, logits_tokens=None, causal=False)
    assert ours.scorer > 0 and ours.scorer_measured
    assert ours.total == pytest.approx(independent, rel=0.02)
    # fewer tokens ran, so fewer FLOPs than the unrouted prefill
    assert ours.decoder < executed_flops(unrouted_record(record), model, None, causal=False).decoder


def test_causal_attention_counts_half_the_score_matrix():
    dims = DecoderDims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=10, num_layers=1)
    n = 100
    dense, causal = dims.layer_flops(n, causal=False), dims.layer_flops(n, causal=True)
    # Score and value products: 2 * 2 * heads * head_dim FLOPs per (query, key) pair.
    assert dense - causal == 4 * 4 * 16 * (n * n - n * (n + 1) // 2)


def test_formula_and_avg_T():
    model, inputs = case("llava")
    cfg = RoutingConfig("prune", "last_token_attention", [Stage(2, 5)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
        record = router.last_record
    t = model.config.text_config
    d, m, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    seq = int(inputs["attention_mask"].sum())
    nv = int(record.num_visual[0])
    ns = [seq] * 2 + [seq - nv + 5] * (layers - 2)
    expected = sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in ns) / 1e12
    assert formula_tflops(record, model) == pytest.approx(expected)
    assert record.avg_T == pytest.approx(schedule_avg_T(cfg, layers, nv))
    acc = account(record, model)
    assert acc.avg_T == pytest.approx(record.avg_T)
    assert any("not measured" in n for n in acc.notes)
    assert acc.ideal_speedup > 1


def tensor_bytes(cache):
    """Independent count: walk the cache's layers and add up every key and value tensor."""
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


@pytest.mark.parametrize("name", ["llava", "qwen2.5"])
@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_kv_bytes_of_a_routed_prefill(name, action):
    model, inputs = case(name)
    cfg = RoutingConfig(action, "last_token_attention", [Stage(1, 8), Stage(3, 4), Stage(4, 6)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs, use_cache=True)
        record = router.last_record
    cache = out.past_key_values
    assert cache_kv_bytes(cache) == tensor_bytes(cache) == cache.kv_bytes()
    assert record_kv_bytes(record, model, 4) == tensor_bytes(cache)  # one sample: no padding entries
    acc = account(record, model, cache)
    assert acc.kv_bytes == tensor_bytes(cache) < acc.kv_bytes_unrouted
    with torch.no_grad():
        plain = model(**inputs, use_cache=True).past_key_values
    assert unrouted_kv_bytes(record, model, 4) == tensor_bytes(plain)


def test_kv_bytes_of_a_padded_batch_count_the_padding():
    model, _ = case("llava")
    inputs = llava_batch(model, [[1, 5, 6, 7, 8, 9, 10], [1, 11]], [1, 1])
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(2, 6)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs, use_cache=True)
        record = router.last_record
    cache = out.past_key_values
    assert cache_kv_bytes(cache) == tensor_bytes(cache) >= record_kv_bytes(record, model, 4)

"""Scoring never builds an L x L attention map: the peak memory a scorer allocates on a ~3,000-token sequence,
measured from the CPU allocator's events (torch profiler, profile_memory), stays far below one L x L fp32 map."""

from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tiny import llava_batch, qwen_batch, tiny_llava, tiny_qwen
from visroute import RoutingConfig, Stage, apply_routing
from visroute.families import adapter_for
from visroute.scoring import build_scorer


def peak_allocated(fn) -> int:
    """Peak of bytes allocated and not yet freed while `fn` runs, from the profiler's allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_the_measure_sees_a_large_allocation():
    n = 1500
    assert peak_allocated(lambda: torch.ones(n, n)) >= n * n * 4
    assert peak_allocated(lambda: torch.ones(10, 10)) < 100_000


@pytest.fixture(scope="module")
def long_llava():
    model = tiny_llava(image_size=440)  # 55 x 55 = 3025 visual tokens per image
    inputs = llava_batch(model, [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13]], [1, 1])
    return model, inputs


@pytest.fixture(scope="module")
def long_context(long_llava):
    """The StageContext of a reroute stage at layer 2 of a ~3,030-token batch of 2 (one routed forward)."""
    model, inputs = long_llava
    cfg = RoutingConfig(action="reroute", scorer="random", stages=[Stage(2, 0.02)])
    seen = []
    with apply_routing(model, cfg) as router:
        score = router.scorer.score
        router.scorer.score = lambda ctx: seen.append(ctx) or score(ctx)
        with torch.no_grad():
            model(**inputs, use_cache=False)
    return replace(seen[0], requested=torch.tensor([60, 60]))


DECODER_SCORERS = [("last_token_attention", {}), ("text_attention", {}), ("text_attention", {"raters": True}),
                   ("embedding_similarity", {}), ("hidden_similarity", {"reduce": "max"}), ("duplication", {}),
                   ("diversity", {})]


@pytest.mark.parametrize("scorer, options", DECODER_SCORERS)
def test_decoder_scorers_stay_far_below_an_attention_map(long_context, scorer, options):
    ctx = long_context
    length = ctx.valid.shape[1] - 1
    one_map = length * length * 4
    out = []
    with torch.no_grad():
        peak = peak_allocated(lambda: out.append(build_scorer(scorer, options).score(ctx)))
    assert out[0].shape == (2, 3025) and bool(out[0].isfinite().all())
    print(f"{scorer} {options}: peak {peak / 2**20:.2f} MiB; one {length}x{length} fp32 map {one_map / 2**20:.1f} MiB")
    assert peak < one_map / 4


def _hook_peak(module, hook_id, args, kwargs):
    """Peak memory of one of visroute's forward pre-hooks on `module`, called alone on the given inputs."""
    hook = module._forward_pre_hooks[hook_id]
    with torch.no_grad():
        return peak_allocated(lambda: hook(module, args, kwargs))


def test_llava_cls_row_stays_far_below_an_attention_map(long_llava):
    model, inputs = long_llava
    adapter = adapter_for(model)
    attn = adapter.vision_attention_modules()[1]
    seen, scores = {}, []
    grab = attn.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    handles = adapter.hook_vision_scores(1, scores.append)
    try:
        with torch.no_grad():
            model.model.vision_tower(inputs["pixel_values"])
        peak = _hook_peak(attn, handles[-1].id, seen["args"], seen["kwargs"])
    finally:
        grab.remove()
        for h in handles:
            h.remove()
    tokens = 3026  # patches + [CLS]
    assert scores[-1].shape == (2 * 3025,)
    print(f"llava [CLS] row: peak {peak / 2**20:.2f} MiB; one {tokens}x{tokens} map {tokens**2 * 4 / 2**20:.1f} MiB")
    assert peak < tokens * tokens * 4 / 4


def test_qwen_mean_received_stays_far_below_an_attention_map():
    model = tiny_qwen("2.5")
    adapter = adapter_for(model)
    tower = model.model.visual
    attn = adapter.vision_attention_modules()[1]  # the full-attention block
    grid = torch.tensor([[1, 56, 56]])  # 3136 patches, 784 visual tokens
    patches = 56 * 56
    scores = []
    handles = adapter.hook_vision_scores(1, scores.append)
    adapter._last_grid_thw = grid  # what the adapter's tower hook remembers from the tower call
    try:
        head_dim = tower.config.hidden_size // tower.config.num_heads
        kwargs = {"cu_seqlens": torch.tensor([0, patches], dtype=torch.int32),
                  "position_embeddings": (torch.randn(patches, head_dim), torch.randn(patches, head_dim))}
        peak = _hook_peak(attn, handles[0].id, (torch.randn(patches, tower.config.hidden_size),), kwargs)
    finally:
        for h in handles:
            h.remove()
    assert scores[-1].shape == (784,)
    print(f"qwen received: peak {peak / 2**20:.2f} MiB; one {patches}x{patches} map {patches**2 * 4 / 2**20:.1f} MiB")
    assert peak < patches * patches * 4 / 4

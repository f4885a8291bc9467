"""The pooling control (scorer `pool` + merge `pool_average` at layer 0) against a hand pooling of the token grid:
the blocks by hand, and on a tiny LLaVA the unmodified model (eager, masks) fed the hand-pooled embeddings at the
blocks' centre tokens with every other visual token masked out."""

from __future__ import annotations

import pytest
import torch

from oracle import decoder_inputs, eager_copy, masked_run, text_positions, visual_positions
from test_nuwa import fed
from tiny import IMAGE_TOKEN, llava_batch, tiny_llava
from visroute import RoutingConfig, Stage, apply_routing
from visroute.scoring.controls import pool_blocks

SIDE = 6  # a 48-pixel image in 8-pixel patches: a 6 x 6 token grid


def test_pool_blocks_by_hand():
    # 4 x 6 into 6 blocks: 2 block-rows of 3 blocks, each 2 x 2
    block, centres = pool_blocks(4, 6, 6)
    assert block.view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                         [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    assert centres.tolist() == [0, 2, 4, 12, 14, 16]
    # 5 x 5 into 4: split at rows 2 and columns 2; centres ((0+2-1)//2, ...) and ((2+5-1)//2, ...)
    block, centres = pool_blocks(5, 5, 4)
    assert block.view(5, 5).tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3],
                                         [2, 2, 3, 3, 3]]
    assert centres.tolist() == [0, 3, 15, 18]
    # 24 x 24 at 64: 8 x 8 blocks of 3 x 3, centred
    block, centres = pool_blocks(24, 24, 64)
    assert torch.bincount(block).tolist() == [9] * 64 and centres[:2].tolist() == [25, 28]
    # a count that is no product: exactly that many blocks, sides differing by at most one
    block, centres = pool_blocks(24, 24, 128)
    assert len(centres) == 128 and set(torch.bincount(block).tolist()) <= {4, 6, 9}
    assert len(pool_blocks(3, 3, 50)[1]) == 9


def hand_pool(grid: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """A SIDE x SIDE grid of embeddings (SIDE*SIDE, D) pooled to k = s*s by explicit loops over s x s blocks of
    (SIDE/s)^2 tokens: (the centre token of each block, row-major; the block means)."""
    s = int(round(k ** 0.5))
    w = SIDE // s
    centres, means = [], []
    for bi in range(s):
        for bj in range(s):
            cells = [(bi * w + r) * SIDE + bj * w + c for r in range(w) for c in range(w)]
            centres.append((bi * w + (w - 1) // 2) * SIDE + bj * w + (w - 1) // 2)
            means.append(sum(grid[t] for t in cells) / len(cells))
    return centres, torch.stack(means)


@pytest.fixture(scope="module")
def model():
    m = tiny_llava(image_size=48)
    return m, eager_copy(m, lambda attn: tiny_llava(attn=attn, image_size=48))


@pytest.mark.parametrize("keep,images", [(9, [1, 1]), (4, [1, 1]), (0.25, [1, 2])])
def test_pooling_control_equals_the_masking_oracle_fed_hand_pooled_embeddings(model, keep, images):
    model, eager = model
    inputs = llava_batch(model, [[5, 6, 7, 8], [9, 10, 11]], images, seed=3)
    cfg = RoutingConfig("prune", "pool", [Stage(0, keep, merge="pool_average")])
    with apply_routing(model, cfg) as router, torch.no_grad():
        logits = model(**inputs).logits
    rec = router.last_record
    embeds = decoder_inputs(eager, inputs)[0].clone()
    raw = embeds.clone()
    positions = visual_positions(inputs["input_ids"], IMAGE_TOKEN)
    active = torch.zeros(len(images), max(len(p) for p in positions), dtype=torch.bool)
    for b, p in enumerate(positions):
        for image in range(images[b]):
            tokens = p[image * SIDE * SIDE:(image + 1) * SIDE * SIDE]
            k = int(keep) if isinstance(keep, int) else int(keep * SIDE * SIDE)  # the same share per image here
            centres, means = hand_pool(raw[b, tokens], k)
            embeds[b, tokens[centres]] = means
            active[b, [image * SIDE * SIDE + c for c in centres]] = True
        assert rec.stages[0].selected[b].tolist() == active[b].nonzero().flatten().tolist()
    with fed(eager, embeds, positions):
        ref = masked_run(eager, inputs, IMAGE_TOKEN, [(0, active)], "prune").logits
    text = text_positions(inputs, IMAGE_TOKEN)
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
    # the pooling matters: the same selection without the merge answers differently
    unpooled = masked_run(eager, inputs, IMAGE_TOKEN, [(0, active)], "prune").logits
    assert (unpooled[text] - ref[text]).abs().max() > 1e-3


def test_pool_average_refuses_a_selection_that_is_not_the_block_centres(model):
    model, _ = model
    inputs = llava_batch(model, [[5, 6, 7]], [1])
    cfg = RoutingConfig("prune", "uniform", [Stage(0, 9, merge="pool_average")])
    with apply_routing(model, cfg), torch.no_grad(), pytest.raises(ValueError, match="scorer pool"):
        model(**inputs)

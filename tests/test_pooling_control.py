"""The pooling control (scorer `pool` + merge `pool_average` at layer 0) against a hand pooling of the token grid:
the blocks by hand, and on a tiny LLaVA (a 6 x 6 grid) and a tiny Qwen2.5-VL (its merged grids) the unmodified
model (eager, masks) fed the hand-pooled embeddings at the blocks' centre tokens, every other visual token masked
out."""

from __future__ import annotations

import pytest
import torch

from oracle import decoder_inputs, eager_copy, masked_run, text_positions, visual_positions
from test_nuwa import fed
from tiny import IMAGE_TOKEN, QWEN_IMAGE, llava_batch, qwen_batch, tiny_llava, tiny_qwen
from visroute import RoutingConfig, Stage, apply_routing
from visroute.scoring.controls import pool_blocks

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


def hand_pool(grid: torch.Tensor, rows: int, cols: int, bh: int, bw: int) -> tuple[list[int], torch.Tensor]:
    """A rows x cols grid of embeddings (rows*cols, D) pooled by explicit loops over bh x bw blocks: (the centre
    token of each block, row-major, ((bh-1)//2, (bw-1)//2) inside it; the block means)."""
    centres, means = [], []
    for bi in range(rows // bh):
        for bj in range(cols // bw):
            cells = [(bi * bh + r) * cols + bj * bw + c for r in range(bh) for c in range(bw)]
            centres.append((bi * bh + (bh - 1) // 2) * cols + bj * bw + (bw - 1) // 2)
            means.append(sum(grid[t] for t in cells) / len(cells))
    return centres, torch.stack(means)


@pytest.fixture(scope="module")
def llava():
    m = tiny_llava(image_size=48)
    return m, eager_copy(m, lambda attn: tiny_llava(attn=attn, image_size=48)), IMAGE_TOKEN


@pytest.fixture(scope="module")
def qwen():
    m = tiny_qwen("2.5")
    return m, eager_copy(m, lambda attn: tiny_qwen("2.5", attn=attn)), QWEN_IMAGE


# (keep, per sample: per image (rows, cols) of its token grid and the block side the hand pooling uses)
LLAVA_CASES = [(9, [[(6, 6, 2)], [(6, 6, 2)]]), (4, [[(6, 6, 3)], [(6, 6, 3)]]),
               (0.25, [[(6, 6, 2)], [(6, 6, 2), (6, 6, 2)]])]
# Qwen2.5-VL: the merged grids (patch grids 8 x 12, 8 x 8 and 4 x 8 after the 2 x 2 merge); keep 6 of 24 pools
# the 4 x 6 grid in 2 x 2 blocks; of 16 + 8 the images get 4 and 2: 2 x 2 blocks again
QWEN_CASES = [(6, [[(4, 6, 2)], [(4, 4, 2), (2, 4, 2)]])]


def _check(model, eager, token, inputs, keep, images):
    cfg = RoutingConfig("prune", "pool", [Stage(0, keep, merge="pool_average")])
    with apply_routing(model, cfg) as router, torch.no_grad():
        logits = model(**inputs).logits
    rec = router.last_record
    embeds = decoder_inputs(eager, inputs)[0].clone()
    raw = embeds.clone()
    positions = visual_positions(inputs["input_ids"], token)
    active = torch.zeros(len(images), max(len(p) for p in positions), dtype=torch.bool)
    for b, p in enumerate(positions):
        offset = 0
        for rows, cols, side in images[b]:
            tokens = p[offset:offset + rows * cols]
            centres, means = hand_pool(raw[b, tokens], rows, cols, side, side)
            embeds[b, tokens[centres]] = means
            active[b, [offset + c for c in centres]] = True
            offset += rows * cols
        assert rec.stages[0].selected[b].tolist() == active[b].nonzero().flatten().tolist()
    with fed(eager, embeds, positions):
        ref = masked_run(eager, inputs, token, [(0, active)], "prune").logits
    text = text_positions(inputs, token)
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
    # the pooling matters: the same selection without the merge answers differently
    unpooled = masked_run(eager, inputs, token, [(0, active)], "prune").logits
    assert (unpooled[text] - ref[text]).abs().max() > 1e-3


@pytest.mark.parametrize("keep,images", LLAVA_CASES)
def test_pooling_control_equals_the_masking_oracle_fed_hand_pooled_embeddings(llava, keep, images):
    model, eager, token = llava
    inputs = llava_batch(model, [[5, 6, 7, 8], [9, 10, 11]], [len(i) for i in images], seed=3)
    _check(model, eager, token, inputs, keep, images)


@pytest.mark.parametrize("keep,images", QWEN_CASES)
def test_pooling_control_on_qwen_pools_the_merged_grid(qwen, keep, images):
    model, eager, token = qwen
    inputs = qwen_batch(model, [[5, 6, 7, 8], [9, 10, 11]], [[(8, 12)], [(8, 8), (4, 8)]], seed=3)
    _check(model, eager, token, inputs, keep, images)


def test_pool_average_refuses_a_selection_that_is_not_the_block_centres(llava):
    model, _, _ = llava
    inputs = llava_batch(model, [[5, 6, 7]], [1])
    cfg = RoutingConfig("prune", "uniform", [Stage(0, 9, merge="pool_average")])
    with apply_routing(model, cfg), torch.no_grad(), pytest.raises(ValueError, match="scorer pool"):
        model(**inputs)

"""LLaVA-NeXT and LLaVA-OneVision under routing (families/llava_next.py): any-resolution tiles whose visual tokens
are the base tile and the unpadded high-resolution map with a newline token ending each row. Padded batches of
several images of different sizes and aspect ratios (unpadding in rows or columns, several tiles, OneVision's
bilinear downsampling and its untiled images of multi-image samples), against the eager masking oracle; the
layout, the vision-tower scores and the box -> token map against the model's own feature path."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import PROMPTS
from oracle import eager_copy, masked_run, text_positions, tiled_layout, tiled_vision_reference
from tiny import IMAGE_TOKEN, llava_next_batch, tiny_llava_next
from visroute import RoutingConfig, Stage, apply_routing
from visroute.families import families
from visroute.families.llava_next import LlavaNextAdapter

BUILD = {"llava_next": tiny_llava_next, "llava_onevision": partial(tiny_llava_next, "onevision")}
# (height, width) pixels: unpadded rows; two images (OneVision: untiled); 3 x 3 tiles (OneVision: downsampled)
IMAGES = [[(20, 64)], [(64, 64), (64, 16)], [(70, 90)]]
ACTIONS = ("prune", "reroute")
SCHEDULES = {
    "before-decoder": ("vision_cls_attention", [Stage(0, 12), Stage(3, 0.3)]),
    "uniform": ("uniform", [Stage(0, 0.5), Stage(2, 9)]),
    "across": ("last_token_attention", [Stage(1, 0.5), Stage(2, 7), Stage(4, 0.1)]),
}
_MODELS: dict = {}


def models(name):
    """(model, eager copy, padded batch) of a tiny model of the family, built once."""
    if name not in _MODELS:
        model = BUILD[name]()
        _MODELS[name] = (model, eager_copy(model, BUILD[name]), llava_next_batch(model, PROMPTS, IMAGES))
    return _MODELS[name]


def image_inputs(inputs):
    return {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in inputs}


def routed(model, inputs, cfg):
    with apply_routing(model, cfg) as router, torch.no_grad():
        return model(**inputs).logits, router.last_record


def decisions(record):
    return [(st.layer, st.active) for st in record.stages]


def newline_mask(model, inputs):
    """(B, Nv) the visual tokens that hold the newline vector, found from the input embeddings the model makes with
    a marked newline vector (independent of the adapter's layout)."""
    inner = model.model
    saved = inner.image_newline.detach().clone()
    seen = {}
    hook = inner.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            inner.image_newline.fill_(7.0)
            model(**inputs)
    finally:
        hook.remove()
        with torch.no_grad():
            inner.image_newline.copy_(saved)
    marked = seen["inputs_embeds"].eq(7.0).all(-1)
    rows = [m[ids.eq(IMAGE_TOKEN)] for m, ids in zip(marked, inputs["input_ids"])]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@pytest.mark.parametrize("name", BUILD)
@pytest.mark.parametrize("action", ACTIONS)
def test_keep_all_equals_the_unmodified_model(name, action):
    model, _, inputs = models(name)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    cfg = RoutingConfig(action, "last_token_attention", [Stage(0, 1.0), Stage(2, 10_000), Stage(4, 1.0)])
    logits, _ = routed(model, inputs, cfg)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    with apply_routing(model, cfg), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ref_gen)


@pytest.mark.parametrize("keep_newlines", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", BUILD)
@pytest.mark.parametrize("action", ACTIONS)
def test_routed_equals_the_masking_oracle(name, action, schedule, keep_newlines):
    model, eager, inputs = models(name)
    scorer, stages = SCHEDULES[schedule]
    cfg = RoutingConfig(action, scorer, stages, family_options={"keep_newlines": keep_newlines})
    logits, record = routed(model, inputs, cfg)
    text = text_positions(inputs, IMAGE_TOKEN)
    ref = masked_run(eager, inputs, IMAGE_TOKEN, decisions(record), action).logits
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
    newlines = newline_mask(model, inputs)
    counts = record.num_visual.tolist()
    before = list(counts)  # what each sample's stage could keep at most: prune, the previous stage's tokens
    for stage, st in zip(stages, record.stages):
        for i, n in enumerate(counts):
            want = stage.keep if isinstance(stage.keep, int) else int(stage.keep * n)
            pinned = int(newlines[i].sum()) if keep_newlines else 0  # always active, counted towards the keep
            assert int(st.kept[i]) == min(max(want, pinned), before[i] if action == "prune" else n)
            if keep_newlines:
                assert st.active[i][newlines[i]].all()
        before = st.kept.tolist()
    assert any(int(st.kept[i]) < counts[i] for st in record.stages for i in range(3))
    # the comparison can fail: other selections give other logits
    other = [(layer, act.roll(1, dims=1) & act) for layer, act in decisions(record)]
    wrong = masked_run(eager, inputs, IMAGE_TOKEN, other, action).logits
    assert (wrong[text] - logits[text]).abs().max() > 1e-3


@pytest.mark.parametrize("name", BUILD)
def test_the_layout_is_the_models_own(name):
    """Spans, their grids and the newline column against what the model itself makes: the feature count per image
    (its get_image_features), and where the newline vector lands (a marked newline vector); and `image_parts`
    against the model's packing over many image sizes."""
    model, _, inputs = models(name)
    _, record = routed(model, inputs, RoutingConfig("prune", "random", [Stage(1, 0.5)]))
    with torch.no_grad():
        feats = model.model.get_image_features(**image_inputs(inputs)).pooler_output
    lengths = iter(int(f.shape[0]) for f in feats)
    newlines = newline_mask(model, inputs)
    for i, spans in enumerate(record.images):
        assert [s.offset for s in spans] == [sum(t.length for t in spans[:k]) for k in range(len(spans))]
        assert sum(s.length for s in spans) == int(record.num_visual[i])
        expected = torch.zeros(int(record.num_visual[i]), dtype=torch.bool)
        for base, rest in zip(spans[::2], spans[1::2]):
            assert base.tiles > 0 and (base.rows, base.cols) == (4, 4) and rest.tiles == 0
            assert base.length + rest.length == next(lengths)
            assert rest.newline_column and rest.length == rest.rows * rest.cols
            if rest.length == 1:  # an untiled image: its one newline token
                assert name == "llava_onevision"
            expected[rest.offset + rest.cols - 1 : rest.offset + rest.length : rest.cols] = True
        assert torch.equal(newlines[i, : len(expected)], expected)
    # image_parts against the model's own packing (features 0, the newline vector 1) over many sizes
    config, inner = model.config, model.model
    for h in (8, 17, 32, 45, 64, 90, 100):
        for w in (8, 20, 32, 50, 64, 97):
            for tiled in (True, False) if name == "llava_onevision" else (True,):
                parts = families()[name].image_parts(config, h, w, tiled)
                feature = torch.zeros(parts.tiles, 16, 1)
                sizes = torch.tensor([[h, w]])
                if name == "llava_next":
                    packed = inner.pack_image_features([feature], sizes, "default", image_newline=torch.ones(1))[0][0]
                else:
                    packed = inner.pack_image_features([feature], sizes, image_newline=torch.ones(1),
                                                       vision_aspect_ratio=config.vision_aspect_ratio)[0][0]
                assert packed.shape[0] == parts.length, (h, w, tiled)
                assert packed[:, 0].nonzero().flatten().tolist() == parts.newline_offsets(), (h, w, tiled)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", BUILD)
def test_vision_scores_equal_the_towers_eager_attention_through_the_tile_layout(name, layer):
    """CLIP: [CLS] attention; SigLIP (no [CLS]): attention received within the tile; both per tile, laid out as
    the features are (tiles, unpadding, OneVision's downsampling and untiled images)."""
    model, eager, inputs = models(name)
    options = {} if layer == 1 else {"layer": layer}
    cfg = RoutingConfig("prune", "vision_cls_attention", [Stage(0, 0.5)], scorer_options=options)
    _, record = routed(model, inputs, cfg)
    pieces = iter(tiled_vision_reference(eager, inputs, layer))
    for i, spans in enumerate(record.images):
        expected = torch.cat([next(pieces) for _ in spans])
        torch.testing.assert_close(record.stages[0].scores[i, : len(expected)], expected, atol=1e-5, rtol=1e-4)
    # and under generate (image_sizes popped before the prefill) the same scores
    with apply_routing(model, cfg) as router, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        torch.testing.assert_close(router.last_record.stages[0].scores, record.stages[0].scores)


@pytest.mark.parametrize("name", BUILD)
def test_tower_features_for_merges_are_laid_out_as_the_features(name):
    """The per-tile keys and mean features LLaVA-1.5's hooks give, laid out per visual token exactly as the model
    lays out its image features (`tiled_layout`, one channel at a time); merges run on the decoder input
    embeddings (no projector input per visual token)."""
    from visroute.families.llava import LlavaAdapter

    model, _, inputs = models(name)
    got = {}
    with apply_routing(model, RoutingConfig()) as router:
        adapter = router.adapter
        assert adapter.hook_projector_input(lambda t: None) is None
        handles = (adapter.hook_vision_keys(None, lambda t: got.update(keys=t))
                   + adapter.hook_vision_features(0, 1, lambda t: got.update(features=t))
                   + LlavaAdapter.hook_vision_keys(adapter, None, lambda t: got.update(tile_keys=t))
                   + LlavaAdapter.hook_vision_features(adapter, 0, 1, lambda t: got.update(tile_features=t)))
        with torch.no_grad():
            model(**inputs)
        for h in handles:
            h.remove()
    visual = int(inputs["input_ids"].eq(IMAGE_TOKEN).sum())
    for what, per_tile in (("keys", got["tile_keys"]), ("features", got["tile_features"])):
        assert got[what].shape == (visual, per_tile.shape[-1])
        tiles = per_tile.view(-1, 16, per_tile.shape[-1])
        for c in range(0, per_tile.shape[-1], 7):
            expected = torch.cat(tiled_layout(model, inputs, tiles[..., c]))
            torch.testing.assert_close(got[what][:, c], expected, atol=1e-5, rtol=1e-5)
    cfg = RoutingConfig("prune", "vision_cls_attention", [Stage(0, 12, merge="visionzip"), Stage(2, 0.5)])
    logits, record = routed(model, inputs, cfg)
    assert torch.isfinite(logits).all() and record.stages[0].kept.tolist() == [12, 12, 12]


def test_boxes_map_onto_the_tokens_of_both_grids():
    """A white box on a black image, through LLaVA-NeXT's own image processor (nearest resampling) and the model's
    feature layout: the tokens whose patches hold box pixels are `tokens_of(box)`, in the base tile and in the
    unpadded high-resolution map."""
    from PIL import Image
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tiny import NEXT_PINPOINTS

    model, _, _ = models("llava_next")
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_grid_pinpoints=NEXT_PINPOINTS, resample=PILImageResampling.NEAREST,
                                           do_normalize=False, do_center_crop=False)
    adapter = LlavaNextAdapter(model)
    # (height, width), box (x0, y0, x1, y1) in pixels; the last two lie where unpadding cut the map: only the base
    # tile shows them
    cases = [((32, 64), (16, 8, 32, 24)), ((20, 64), (0, 2, 16, 10)), ((64, 16), (4, 24, 12, 40)),
             ((64, 64), (40, 8, 56, 40)), ((20, 64), (0, 0, 16, 2)), ((64, 20), (18, 30, 20, 40))]
    for (h, w), (x0, y0, x1, y1) in cases:
        pixels = torch.zeros(h, w, 3, dtype=torch.uint8)
        pixels[y0:y1, x0:x1] = 255
        image = Image.fromarray(pixels.numpy())
        inputs = processor(images=[image], return_tensors="pt")
        tiles = inputs["pixel_values"][0]  # (tiles, 3, 32, 32): the tower's input tiles
        bright = tiles.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).amax((-1, -2)).flatten(1)  # (tiles, 16) per patch
        lit = tiled_layout(model, inputs, bright)[0].gt(0).nonzero().flatten().tolist()
        frame = adapter.image_frames(processor, [image], inputs)[0]
        box = [x0 / w, y0 / h, x1 / w, y1 / h]
        assert frame.tokens_of(box) == lit, (h, w)
        assert frame.num_tokens == LlavaNextAdapter.image_parts(model.config, h, w).length
        assert frame.to_answer(box) == pytest.approx(box)  # [0, 1] over the image
    assert families()["llava_next"].box_frame == "normalized"


def test_the_processors_placeholders_and_a_saved_model(tmp_path):
    """LLaVA-NeXT's own processor (its token count per image) agrees with the layout on images of several aspect
    ratios; the model and processor saved and loaded back route under generate, image_sizes popped."""
    from PIL import Image
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tiny import NEXT_PINPOINTS, tiny_llava_processor
    from visroute.loading import load_model

    model, _, _ = models("llava_next")
    images = [Image.new("RGB", (w, h), (40, 90, 200)) for h, w in [(20, 64), (64, 16), (70, 90)]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=NEXT_PINPOINTS),
        tokenizer=tiny_llava_processor(model).tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>")
    texts = [LlavaNextAdapter.plain_prompt("what is the colour ?", 1, "<image>") for _ in images]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    placeholders = inputs["input_ids"].eq(IMAGE_TOKEN).sum(1).tolist()
    assert placeholders == [LlavaNextAdapter.image_parts(model.config, im.height, im.width).length for im in images]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path))
    inputs = loaded_processor(images=images, text=texts, padding=True, return_tensors="pt")
    cfg = RoutingConfig("reroute", "vision_cls_attention", [Stage(0, 0.5), Stage(2, 0.25)])
    with apply_routing(loaded, cfg) as router, torch.no_grad():
        out = loaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert router.last_record.num_visual.tolist() == placeholders
    assert [sum(s.tiles for s in spans) for spans in router.last_record.images] == [3, 3, 5]  # 1x2, 2x1, 2x2 + base


@pytest.mark.parametrize("name", BUILD)
def test_vision_flops_match_the_flop_counter(name):
    _, eager, inputs = models(name)
    with apply_routing(eager, RoutingConfig()) as router, torch.no_grad():
        eager(**inputs)
        spans = [span for sample in router.last_record.images for span in sample]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager.model.get_image_features(**image_inputs(inputs))
    tower, projector = families()[name].vision_flops(eager.config, spans)
    assert tower + projector == counter.get_total_flops()


def test_beam_search_lays_out_every_copy_of_a_sample():
    model, _, inputs = models("llava_next")
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(1, 0.5), Stage(3, 0.25)])
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    with apply_routing(model, RoutingConfig("prune", "last_token_attention", [Stage(1, 1.0)])), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False), ref)
    with apply_routing(model, cfg) as router, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    record = router.last_record
    assert record.batch_size == 6 and record.images[0] == record.images[1] and record.images[2] == record.images[3]


def test_a_mistral_sliding_window_is_refused_not_ignored():
    model = tiny_llava_next(decoder="mistral", sliding_window=64)
    short = llava_next_batch(model, [[1, 5, 6]], [[(32, 32)]])  # 16 + 4 x 5 tokens + text: within the window
    long = llava_next_batch(model, [[1, 5, 6]], [[(64, 64)]])
    assert short["input_ids"].shape[1] < 64 < long["input_ids"].shape[1]
    cfg = RoutingConfig("prune", "last_token_attention", [Stage(1, 1.0)])
    with torch.no_grad():
        ref = model(**short).logits
        model(**long)  # the unrouted model applies its window
    with apply_routing(model, cfg), torch.no_grad():
        torch.testing.assert_close(model(**short).logits, ref, atol=2e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="sliding window of 64"):
            model(**long)
        room = 64 - short["input_ids"].shape[1]
        with pytest.raises(ValueError, match="sliding window of 64"):  # decoding past the window
            model.generate(**short, max_new_tokens=room + 3, min_new_tokens=room + 3, do_sample=False)


def test_features_that_form_no_grid_are_refused():
    model = tiny_llava_next()
    model.config.vision_feature_select_strategy = "full"  # [CLS] among each tile's features
    with pytest.raises(ValueError, match="no 4 x 4 grid"):
        apply_routing(model, RoutingConfig())


def test_onevision_videos_are_refused():
    model, _, inputs = models("llava_onevision")
    video = dict(inputs, input_ids=inputs["input_ids"].clone())
    video["input_ids"][0, -2] = model.config.video_token_id
    with apply_routing(model, RoutingConfig("prune", "random", [Stage(1, 0.5)])), torch.no_grad():
        with pytest.raises(ValueError, match="video"):
            model(**video)


def test_presets_and_the_bench_shape(tmp_path, capsys):
    from visroute.bench import model_config
    from visroute.bench.shapes import family_of
    from visroute.budget import preset
    from visroute.cli import main

    config = model_config("llava-next-7b")
    with torch.device("meta"):
        model = family_of("llava-next-7b").model_class(config)(config)
    # LLaVA-1.5-7B's parameters and the 4,096-wide newline vector
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072 + 4096
    assert LlavaNextAdapter.visual_tokens(config, 672, 672) == 576 + 48 * 49  # 2 x 2 tiles + base, 48 newlines
    inputs = LlavaNextAdapter.synthetic_inputs(config, 64, 672, 672, torch.Generator().manual_seed(0))
    assert int(inputs["input_ids"].eq(config.image_token_id).sum()) == 2928
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336) and inputs["image_sizes"].tolist() == [[672, 672]]
    with pytest.raises(ValueError, match="tier"):
        preset("pdrop", 128, "llava-next-7b", num_visual=2928)
    assert preset("pdrop", 320, "llava-next-7b", num_visual=2928).stages
    out = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "llava-next-tiny", "--dtype", "float32", "--preset", "pdrop@320", "--repeats", "1",
               "--warmup", "0", "--decode-repeats", "0", "--text-tokens", "16", "--image-size", "96x192",
               "--no-keep-all", "--no-memory", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    base, pdrop = json.loads(out.read_text())["results"]
    assert base["avg_T"] == 576 + 24 * 49 and pdrop["avg_T"] == pytest.approx(320, abs=1)
    assert pdrop["accounting"]["flops"]["total"] < base["accounting"]["flops"]["total"]

"""`--show-kept` pictures: the token grid placed where the processor put it, kept cells bright, dropped dim."""

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import tiny_llava, tiny_llava_processor
from visroute.cli import main
from visroute.record import ImageSpan, RoutingRecord, StageRecord
from visroute.visualize import DROPPED, UNSEEN, model_view_box, save_kept_patches


def _coordinate_image(width, height):
    """Red encodes x, green encodes y, in steps of 250 // size per pixel."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = (np.arange(width) * (250 // width))[None, :]
    arr[..., 1] = (np.arange(height) * (250 // height))[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize("do_pad, size", [(False, (64, 48)), (False, (40, 70)), (True, (64, 48))])
def test_grid_box_is_where_the_processor_crops(do_pad, size):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                do_pad=do_pad, do_normalize=False, do_rescale=False)
    image = _coordinate_image(*size)
    seen = torch.as_tensor(np.asarray(ip(images=image)["pixel_values"][0]), dtype=torch.float32)  # (3, 32, 32)
    x0, y0, x1, y1 = model_view_box(image.size, ip)
    centres = torch.arange(32) + 0.5
    x = x0 + centres * (x1 - x0) / 32 - 0.5  # original pixel coordinate of each processed pixel's centre
    y = y0 + centres * (y1 - y0) / 32 - 0.5
    inside_x = (x > 1) & (x < size[0] - 2)  # away from the borders, where padding and filtering blur
    inside_y = (y > 1) & (y < size[1] - 2)
    sx, sy = 250 // size[0], 250 // size[1]
    torch.testing.assert_close(seen[0, 16][inside_x], (sx * x)[inside_x], atol=sx, rtol=0)  # within a pixel
    torch.testing.assert_close(seen[1, :, 16][inside_y], (sy * y)[inside_y], atol=sy, rtol=0)


def test_a_processor_that_does_not_crop_covers_the_whole_image():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    assert model_view_box((70, 30), Qwen2VLImageProcessorPil()) == (0.0, 0.0, 70.0, 30.0)
    assert model_view_box((70, 30), None) == (0.0, 0.0, 70.0, 30.0)


def _record(actives, spans):
    stages = [StageRecord(layer=i, keep=int(a.sum()), active=a, requested=a.sum(1), candidates=a.sum(1),
                          num_visual=a.sum(1)) for i, a in enumerate(actives)]
    n = sum(s.length for s in spans)
    return RoutingRecord(action="prune", scorer="uniform", num_layers=4, num_visual=torch.tensor([n]),
                         images=[spans], seq_lengths=torch.tensor([n + 3]), stages=stages)


def test_kept_cells_stay_bright_dropped_dim_and_cropped_parts_dark(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray(np.full((48, 64, 3), 200, dtype=np.uint8))
    active = torch.zeros(1, 16, dtype=torch.bool)
    active[0, [5, 7, 13, 15]] = True  # cells (1,1), (1,3), (3,1), (3,3) of a 4x4 grid
    path = save_kept_patches(image, _record([active], [ImageSpan(0, 16, 4, 4)]), tmp_path / "k.png",
                             processor=ip, captions=False)
    out = np.asarray(Image.open(path))
    assert out.shape == (48, 64, 3)
    x0, _, x1, _ = model_view_box(image.size, ip)  # the crop spans x0..x1, all rows
    cell_w, cell_h = (x1 - x0) / 4, 48 / 4
    at = lambda row, col: out[int(cell_h * (row + 0.5)), int(x0 + cell_w * (col + 0.5))]  # noqa: E731
    assert (at(1, 1) == 200).all() and (at(3, 3) == 200).all()
    assert (at(0, 0) == round(200 * DROPPED)).all() and (at(2, 1) == round(200 * DROPPED)).all()
    assert (out[24, 2] == round(200 * UNSEEN)).all()  # left of the crop: the model never saw it


def test_several_stages_and_images_tile_the_picture(tmp_path):
    images = [Image.new("RGB", (50, 40), (90, 90, 90)), Image.new("RGB", (30, 20), (90, 90, 90))]
    spans = [ImageSpan(0, 16, 4, 4), ImageSpan(16, 4, 2, 2)]
    actives = [torch.ones(1, 20, dtype=torch.bool), torch.arange(20)[None] % 2 == 0]
    path = save_kept_patches(images, _record(actives, spans), tmp_path / "k.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (2 * 50, 40 + 20)
    with pytest.raises(ValueError, match="holds 2 image"):
        save_kept_patches(images[0], _record(actives, spans), tmp_path / "x.png")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava-show-kept")
    model = tiny_llava()
    model.save_pretrained(folder)
    tiny_llava_processor(model).save_pretrained(folder)
    image = folder / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(image)
    return folder, image


@pytest.mark.parametrize("stages, panels", [("0:0.5", 1), ("0:0.5,2:4", 2)])
def test_generate_show_kept_writes_a_png_of_the_input_image(saved_model, tmp_path, capsys, stages, panels):
    folder, image = saved_model
    out = tmp_path / "kept.png"
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
               "--scorer", "uniform", "--stages", stages, "--max-new-tokens", "1", "--show-kept", str(out)])
    assert rc == 0 and f"kept patches written to {out}" in capsys.readouterr().out
    with Image.open(out) as picture:
        picture.verify()
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (50 * panels, 40)
        pixels = np.asarray(picture.convert("RGB"))
    original = np.asarray(Image.open(image).convert("RGB"))
    first = pixels[:, :50].astype(int)
    assert (first == original).any() and (first < original).any()  # some cells kept as is, some dimmed


def test_a_tiled_image_gets_a_panel_row_per_grid_placed_by_its_frame(tmp_path):
    """LLaVA-NeXT: the base tile and the unpadded high-resolution map are two grids over the same image. With the
    family's frames, the picture draws a row of panels for each, a kept cell bright, a dropped one dim."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tiny import IMAGE_TOKEN, NEXT_PINPOINTS, tiny_llava_next
    from visroute import RoutingConfig, Stage, apply_routing
    from visroute.families import adapter_for

    model = tiny_llava_next()
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_grid_pinpoints=NEXT_PINPOINTS, resample=PILImageResampling.NEAREST,
                                           do_normalize=False, do_center_crop=False)
    image = Image.fromarray(np.full((32, 64, 3), 200, dtype=np.uint8))
    pixels = processor(images=[image], return_tensors="pt")
    adapter = adapter_for(model)
    n = adapter.image_parts(model.config, 32, 64).length
    inputs = {"input_ids": torch.tensor([[1] + [IMAGE_TOKEN] * n + [5, 6]]), **pixels}
    with apply_routing(model, RoutingConfig("prune", "uniform", [Stage(0, n // 3)])) as router, torch.no_grad():
        model(**inputs)
    frame = adapter.image_frames(processor, [image], inputs)[0]
    path = save_kept_patches(image, router.last_record, tmp_path / "k.png", frames=[frame], captions=False)
    out = np.asarray(Image.open(path))
    assert out.shape == (2 * 32, 64, 3)  # one row per grid, one panel per stage
    active = router.last_record.stages[0].active[0]
    (offset, rows, cols, view, stride), = [g for g in [(g.offset, g.rows, g.cols, g.view, g.stride)
                                                      for g in frame.grids] if g[0] > 0]  # the map
    cell_w, cell_h = (view[2] - view[0]) / cols, (view[3] - view[1]) / rows
    for r in range(rows):
        for c in range(cols):
            x, y = int(view[0] + cell_w * (c + 0.5)), int(view[1] + cell_h * (r + 0.5))
            if 0 <= x < 64 and 0 <= y < 32:
                expect = 200 if active[offset + r * stride + c] else round(200 * DROPPED)
                assert abs(int(out[32 + y, x, 0]) - expect) <= 1, (r, c)

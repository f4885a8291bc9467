"""Pictures of what routing kept: the input image with the visual tokens each stage kept shown at full
brightness and the dropped ones dimmed, one panel per stage.

Each visual token of an image covers one cell of its grid (`ImageSpan` rows x cols). The grid covers the part of
the original image the model saw, which depends on the processor: CLIP-style processors (LLaVA-1.5) may pad to a
square, resize the shortest edge and centre-crop, so the grid covers the crop; Qwen's processor resizes the whole
image to multiples of patch x merge, so the grid covers all of it (`model_view_box`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from visroute.families.base import processor_view_box
from visroute.record import ImageSpan, RoutingRecord

DROPPED = 0.25  # brightness of a dropped token's cell
UNSEEN = 0.1  # brightness of image parts the model never saw (cropped away)


def model_view_box(image_size: tuple[int, int], processor: Any = None) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the original image's pixel coordinates: the region the model's token grid covers.
    It may reach beyond the image where the processor padded. Without a processor, or for one that does not
    crop (Qwen), the whole image."""
    return processor_view_box(image_size, processor)


def _cell_of_pixels(image_size: tuple[int, int], box, rows: int, cols: int) -> torch.Tensor:
    """(H, W) long: the grid cell (row-major) each pixel's centre falls in, -1 outside the grid."""
    width, height = image_size
    x0, y0, x1, y1 = box
    xs = (torch.arange(width, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * cols
    ys = (torch.arange(height, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * rows
    col = xs.floor().long()
    row = ys.floor().long()
    inside = (row[:, None] >= 0) & (row[:, None] < rows) & (col[None, :] >= 0) & (col[None, :] < cols)
    return torch.where(inside, row[:, None] * cols + col[None, :], torch.full_like(inside, -1, dtype=torch.long))


def kept_panel(image, span: ImageSpan, kept: torch.Tensor, processor: Any = None):
    """The image (PIL) with the cells of `kept` (bool over the image's visual tokens) at full brightness and the
    others dimmed. A video's frames are folded: a cell counts as kept if it is kept in any frame."""
    import numpy as np
    from PIL import Image

    if span.rows is None or span.cols is None:
        return image.convert("RGB").copy()  # tokens without a grid cannot be placed
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    kept_cells = kept.view(span.frames, span.rows, span.cols).any(0).flatten()
    cell = _cell_of_pixels(image.size, model_view_box(image.size, processor), span.rows, span.cols)
    brightness = torch.where(cell >= 0, torch.where(kept_cells[cell.clamp(min=0)], 1.0, DROPPED), UNSEEN)
    out = rgb * brightness.numpy().astype(np.float32)[..., None]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _caption(panel, text: str) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(panel)
    left, top, right, bottom = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))


def save_kept_patches(
    image, record: RoutingRecord, path: str | Path, sample: int = 0, processor: Any = None, captions: bool = True
) -> Path:
    """Write a PNG of `sample`'s image(s) with the visual tokens each stage kept highlighted: one panel per
    stage, left to right, each the size of its input image; with several images in the sample, one row per
    image. `image` is a PIL image or a sequence of them (the sample's images, in order); `processor` is the
    model's processor (or its image processor), used to place the token grid on the image."""
    from PIL import Image

    images: Sequence = list(image) if isinstance(image, (list, tuple)) else [image]
    spans = record.images[sample]
    if len(images) != len(spans):
        raise ValueError(f"sample {sample} holds {len(spans)} image(s) but {len(images)} were given")
    if not record.stages:
        raise ValueError("the record holds no stage: nothing was routed")
    rows = []
    for img, span in zip(images, spans):
        panels = []
        for i, stage in enumerate(record.stages):
            kept = stage.active[sample, span.offset : span.offset + span.length].bool()
            panel = kept_panel(img, span, kept, processor)
            if captions:
                _caption(panel, f"stage {i}: layer {stage.layer}, kept {int(kept.sum())}/{span.length}")
            panels.append(panel)
        rows.append(panels)
    width = max(sum(p.width for p in panels) for panels in rows)
    height = sum(panels[0].height for panels in rows)
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    y = 0
    for panels in rows:
        x = 0
        for p in panels:
            sheet.paste(p, (x, y))
            x += p.width
        y += panels[0].height
    path = Path(path)
    sheet.save(path, format="PNG")
    return path

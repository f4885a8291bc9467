"""Pictures of what routing kept: the input image with the visual tokens each stage kept shown at full
brightness and the dropped ones dimmed, one panel per stage.

Each visual token of an image covers one cell of its grid (`ImageSpan` rows x cols). The grid covers the part of
the original image the model saw, which depends on the processor: CLIP-style processors (LLaVA-1.5) may pad to a
square, resize the shortest edge and centre-crop, so the grid covers the crop; Qwen's processor resizes the whole
image to multiples of patch x merge, so the grid covers all of it (`model_view_box`). Given the family's image
frames (`FamilyAdapter.image_frames`), the picture follows them instead, and an image whose tokens form several
grids (LLaVA-NeXT / OneVision: the base tile and the high-resolution map, whose newline tokens cover no cell)
gets one row of panels per grid.
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
    if span.rows is None or span.cols is None:
        return image.convert("RGB").copy()  # tokens without a grid cannot be placed
    kept_cells = kept.view(span.frames, span.rows, span.cols).any(0).flatten()
    return _grid_panel(image, span.rows, span.cols, model_view_box(image.size, processor), kept_cells)


def _caption(panel, text: str) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(panel)
    left, top, right, bottom = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))


def _frame_grids(frame) -> list[tuple[int, int, int, tuple[float, float, float, float], int]]:
    """(offset, rows, cols, view, stride) of each grid of an image frame (one for a plain frame)."""
    grids = getattr(frame, "grids", ())
    if grids:
        return [(g.offset, g.rows, g.cols, g.view, g.stride) for g in grids]
    return [(0, frame.rows, frame.cols, frame.view, frame.cols)]


def _grid_panel(image, rows: int, cols: int, view, kept_cells: torch.Tensor):
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    cell = _cell_of_pixels(image.size, view, rows, cols)
    brightness = torch.where(cell >= 0, torch.where(kept_cells[cell.clamp(min=0)], 1.0, DROPPED), UNSEEN)
    out = rgb * brightness.numpy().astype(np.float32)[..., None]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def save_kept_patches(
    image, record: RoutingRecord, path: str | Path, sample: int = 0, processor: Any = None, captions: bool = True,
    frames: Sequence | None = None,
) -> Path:
    """Write a PNG of `sample`'s image(s) with the visual tokens each stage kept highlighted: one panel per
    stage, left to right, each the size of its input image; with several images in the sample (or several grids
    in an image), one row per image (grid). `image` is a PIL image or a sequence of them (the sample's images,
    in order); `processor` is the model's processor (or its image processor), used to place the token grid on
    the image; `frames` (the family's `image_frames` for these images) place it exactly, tiles included."""
    from PIL import Image

    images: Sequence = list(image) if isinstance(image, (list, tuple)) else [image]
    if not record.stages:
        raise ValueError("the record holds no stage: nothing was routed")
    if frames is not None:
        if len(frames) != len(images):
            raise ValueError(f"{len(images)} image(s) need as many frames, got {len(frames)}")
        parts, offset = [], 0
        for img, frame in zip(images, frames):
            for g_offset, rows, cols, view, stride in _frame_grids(frame):
                index = torch.tensor([offset + g_offset + r * stride + c for r in range(rows) for c in range(cols)])
                parts.append((img, rows, cols, view, index))
            offset += frame.num_tokens
        if offset != int(record.num_visual[sample]):
            raise ValueError(f"the frames hold {offset} visual tokens but sample {sample} has "
                             f"{int(record.num_visual[sample])}")
    else:
        spans = record.images[sample]
        if len(images) != len(spans):
            raise ValueError(f"sample {sample} holds {len(spans)} image(s) but {len(images)} were given")
        parts = []
        for img, span in zip(images, spans):
            if span.rows is None or span.cols is None:
                parts.append((img, None, None, None, None))  # tokens without a grid cannot be placed
                continue
            n = span.rows * span.cols
            index = span.offset + torch.arange(span.frames * n).view(span.frames, n)  # a video's frames are folded
            parts.append((img, span.rows, span.cols, model_view_box(img.size, processor), index))
    rows_of_panels = []
    for img, rows, cols, view, index in parts:
        panels = []
        for i, stage in enumerate(record.stages):
            active = stage.active[sample].bool()
            if rows is None:
                panel, kept = img.convert("RGB").copy(), None
            else:
                kept_cells = active[index]
                kept_cells = kept_cells.any(0) if kept_cells.dim() == 2 else kept_cells
                panel, kept = _grid_panel(img, rows, cols, view, kept_cells), int(kept_cells.sum())
            if captions:
                count = "" if kept is None else f", kept {kept}/{rows * cols}"
                _caption(panel, f"stage {i}: layer {stage.layer}{count}")
            panels.append(panel)
        rows_of_panels.append(panels)
    width = max(sum(p.width for p in panels) for panels in rows_of_panels)
    height = sum(panels[0].height for panels in rows_of_panels)
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    y = 0
    for panels in rows_of_panels:
        x = 0
        for p in panels:
            sheet.paste(p, (x, y))
            x += p.width
        y += panels[0].height
    path = Path(path)
    sheet.save(path, format="PNG")
    return path

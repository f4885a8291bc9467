"""The contract every model-family adapter implements, and what adapters share.

A family module (`families/llava.py`, `families/qwen2_vl.py`, or a third party's) holds every fact about its
models, and nothing outside `families/` tests a class name or a model type:

* which model classes it serves, and what `config.model_type` its configs carry;
* where the decoder, its layers and its rotary embedding live; which positions of a batch are visual tokens and
  how they form image grids;
* facts read off a config alone: visual tokens per image, vision-tower and projector FLOPs;
* the vision tower's attention layers (for vision-attention scores);
* the default chat prompt, and the frame in which its checkpoints write boxes (`ImageFrame`);
* the bench shapes of real checkpoints, with their configs and synthetic inputs.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from visroute.options import HasOptions
from visroute.record import ImageSpan, VisualLayout


@dataclass
class CallInputs:
    """What the top-level forward was called with, as the routed decoder needs it."""

    input_ids: torch.Tensor | None
    visual_mask: torch.Tensor | None  # (B, L) True at visual-token positions, None when there are none
    image_token_counts: list[int]  # tokens of each image of the batch, in batch order
    image_grids: list[tuple[int | None, int | None, int]]  # (rows, cols, frames) per image
    images_given: bool  # pixel values or pre-encoded image features came with the call
    extras: dict[str, Any]


@dataclass(frozen=True)
class ModelShape:
    """The shape of a real checkpoint, for `visroute bench` and the budget presets: the family that builds it,
    the keyword arguments of its decoder (`text`) and vision tower (`vision`) configs, other names the budget
    presets know it by (`aliases`), and the avg_T tiers its papers report (`tiers`)."""

    name: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any]
    description: str
    aliases: tuple[str, ...] = ()
    tiers: tuple[int, ...] = (192, 128, 64)

    @property
    def num_layers(self) -> int:
        return int(self.text["num_hidden_layers"])


# ---- box frames ----------------------------------------------------------------------------------------------------
BOX_FRAMES = {
    "normalized": "x1 y1 x2 y2 in [0, 1] over the processed image (LLaVA-1.5)",
    "pixels": "absolute pixels of the processor-resized image (Qwen2.5-VL)",
    "scale_1000": "[0, 1000) over the processed image (Qwen2-VL)",
    "grid": "integer visual-token grid units, end exclusive (the testbed model)",
}
BOX_FRAME_KEY = "visroute_box_frame"  # a model config attribute: the frame a checkpoint writes boxes in
_EDGE = 1e-6  # a box edge this close to a cell edge does not reach into the next cell


def declared_box_frame(model: Any) -> str | None:
    """The box frame a checkpoint declares in its config (`visroute_box_frame`; the testbed's exports say
    "grid"), which wins over its family's; None when it declares none."""
    frame = getattr(getattr(model, "config", None), BOX_FRAME_KEY, None)
    if frame is not None and frame not in BOX_FRAMES:
        raise ValueError(f"the model's config declares {BOX_FRAME_KEY}={frame!r}, not one of {', '.join(BOX_FRAMES)}")
    return frame


@dataclass(frozen=True)
class ImageFrame:
    """How one image's visual tokens sit on the original image, and the frame in which the model writes boxes.

    width, height: the original image in pixels.
    view:          (x0, y0, x1, y1) in original pixels: the region the processed image shows (beyond the image
                   where the processor padded, inside it where it cropped).
    rows, cols:    the visual-token grid over that region, row-major.
    canvas:        (width, height) of the processed image in pixels (the unit of the `pixels` frame).
    box_frame:     the answer frame, one of `BOX_FRAMES`.

    Boxes are (x1, y1, x2, y2). `to_answer` / `from_answer` convert between the normalised frame of the
    original image (every task's frame) and the model's answer frame."""

    width: int
    height: int
    view: tuple[float, float, float, float]
    rows: int
    cols: int
    canvas: tuple[int, int]
    box_frame: str = "normalized"

    def __post_init__(self) -> None:
        if self.box_frame not in BOX_FRAMES:
            raise ValueError(f"Unknown box frame {self.box_frame!r}; choose one of {', '.join(BOX_FRAMES)}")

    def _units(self) -> tuple[float, float]:
        """Answer-frame units per processed-image width and height."""
        return {"normalized": (1.0, 1.0), "pixels": (float(self.canvas[0]), float(self.canvas[1])),
                "scale_1000": (1000.0, 1000.0), "grid": (float(self.cols), float(self.rows))}[self.box_frame]

    def to_view(self, box: tuple[float, ...] | list[float]) -> list[float]:
        """Normalised box of the original image -> normalised box of the processed image."""
        x0, y0, x1, y1 = self.view
        sx, sy = (x1 - x0) / self.width, (y1 - y0) / self.height
        ox, oy = x0 / self.width, y0 / self.height
        return [(box[0] - ox) / sx, (box[1] - oy) / sy, (box[2] - ox) / sx, (box[3] - oy) / sy]

    def from_view(self, box: tuple[float, ...] | list[float]) -> list[float]:
        """Normalised box of the processed image -> normalised box of the original image."""
        x0, y0, x1, y1 = self.view
        sx, sy = (x1 - x0) / self.width, (y1 - y0) / self.height
        ox, oy = x0 / self.width, y0 / self.height
        return [ox + box[0] * sx, oy + box[1] * sy, ox + box[2] * sx, oy + box[3] * sy]

    def to_answer(self, box: tuple[float, ...] | list[float]) -> list[float]:
        """Normalised box of the original image -> the model's answer frame."""
        ux, uy = self._units()
        v = self.to_view(box)
        return [v[0] * ux, v[1] * uy, v[2] * ux, v[3] * uy]

    def from_answer(self, box: tuple[float, ...] | list[float]) -> list[float]:
        """A box in the model's answer frame -> normalised box of the original image."""
        ux, uy = self._units()
        return self.from_view([box[0] / ux, box[1] / uy, box[2] / ux, box[3] / uy])

    def tokens_of(self, box: tuple[float, ...] | list[float]) -> list[int]:
        """Row-major indices (within this image's visual tokens) of the tokens whose cell overlaps the box (a
        normalised box of the original image) with positive area."""
        v = self.to_view(box)
        c0, c1 = v[0] * self.cols, v[2] * self.cols
        r0, r1 = v[1] * self.rows, v[3] * self.rows
        cols = [c for c in range(self.cols) if c < c1 - _EDGE and c + 1 > c0 + _EDGE]
        rows = [r for r in range(self.rows) if r < r1 - _EDGE and r + 1 > r0 + _EDGE]
        return [r * self.cols + c for r in rows for c in cols]

    @property
    def num_tokens(self) -> int:
        """The image's visual tokens."""
        return self.rows * self.cols


@dataclass(frozen=True)
class TokenGrid:
    """One grid of an image's visual tokens (for `TiledImageFrame`): `rows` x `cols` cells over `view` (x0, y0,
    x1, y1 in original pixels). Its tokens start at `offset` (within the image's visual tokens) and run row-major,
    `stride` tokens a row: more than `cols` where each row ends in tokens that cover no cell (LLaVA-NeXT's
    newline tokens)."""

    offset: int
    rows: int
    cols: int
    view: tuple[float, float, float, float]
    stride: int

    @property
    def length(self) -> int:
        return self.rows * self.stride


@dataclass(frozen=True)
class TiledImageFrame(ImageFrame):
    """An `ImageFrame` for an image whose visual tokens form several grids, one after the other (LLaVA-NeXT and
    LLaVA-OneVision: the base tile, the whole image squashed to one tile, then the unpadded high-resolution map
    with a newline token at the end of each row). `view`, `canvas` and `box_frame` give the answer frame as
    for any frame; `rows` x `cols` are the high-resolution map's grid (the finest one); `grids` holds every grid
    and `tokens_of` maps a box onto the tokens of all of them (newline tokens never: they cover no cell).
    `num_tokens` counts every visual token of the image, newline tokens included."""

    grids: tuple[TokenGrid, ...] = ()
    tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.tokens

    def tokens_of(self, box: tuple[float, ...] | list[float]) -> list[int]:
        """Indices (within this image's visual tokens, ascending) of the tokens of every grid whose cell overlaps
        the box (a normalised box of the original image) with positive area."""
        out = []
        for g in self.grids:
            cells = ImageFrame(self.width, self.height, g.view, g.rows, g.cols, self.canvas, self.box_frame).tokens_of(box)
            out += [g.offset + (c // g.cols) * g.stride + c % g.cols for c in cells]
        return sorted(out)


@dataclass(frozen=True)
class TiledImageSpan(ImageSpan):
    """One part of a tiled image's visual tokens (LLaVA-NeXT / OneVision: the base tile, or the high-resolution
    map, or a lone newline token), with its own grid. `tiles` is how many tiles the vision tower ran for the
    image this part begins (0 on the image's later parts: an image's parts are the span with `tiles` > 0 and
    those after it), which its vision FLOPs are counted from; `newline_column` says the grid's last column holds
    newline tokens, which cover no part of the image."""

    tiles: int = 0
    newline_column: bool = False


def _setting(size: Any, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def processor_view_box(image_size: tuple[int, int], processor: Any = None) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the original image's pixels (`image_size` = (width, height)): the region a CLIP-style
    image processor's output shows. Such processors may pad to a square (`do_pad`), resize the shortest edge and
    centre-crop, so the region may reach beyond the image (padding) or lie inside it (crop). Without a
    processor, or for one that neither crops nor pads, the whole image."""
    width, height = image_size
    ip = getattr(processor, "image_processor", processor)
    crop = getattr(ip, "crop_size", None)
    if ip is None or not getattr(ip, "do_center_crop", False) or _setting(crop, "height") is None:
        return 0.0, 0.0, float(width), float(height)
    # the canvas after an optional pad to a square, the image centred in it
    ox, oy, cw, ch = 0, 0, width, height
    if getattr(ip, "do_pad", False):
        side = max(width, height)
        ox, oy, cw, ch = -((side - width) // 2), -((side - height) // 2), side, side
    size = getattr(ip, "size", None)
    shortest = _setting(size, "shortest_edge")
    if getattr(ip, "do_resize", False) and shortest:
        short, long = min(cw, ch), max(cw, ch)
        new_long = int(shortest * long / short)
        rw, rh = (shortest, new_long) if cw <= ch else (new_long, shortest)
    elif getattr(ip, "do_resize", False) and _setting(size, "height"):
        rw, rh = _setting(size, "width"), _setting(size, "height")
    else:
        rw, rh = cw, ch
    crop_h, crop_w = _setting(crop, "height"), _setting(crop, "width")
    top, left = int((rh - crop_h) / 2.0), int((rw - crop_w) / 2.0)  # negative where the crop pads
    sx, sy = rw / cw, rh / ch
    return ox + left / sx, oy + top / sy, ox + (left + crop_w) / sx, oy + (top + crop_h) / sy


# ---- rotary ------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _default_rope(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class FamilyAdapter(HasOptions):
    """Base adapter. A family sets the class attributes below and implements the methods that raise
    NotImplementedError; `register_family` (visroute.families) makes it known.

    name:           the family's registry name
    model_classes:  names of the model classes it serves (a subclass of one of them is served too)
    model_types:    the `config.model_type` values of those models (for facts read off a config)
    box_frame:      the frame its checkpoints write boxes in (see `BOX_FRAMES`)
    shapes:         bench shapes of real checkpoints
    decoder_inputs: keyword inputs the family's model passes its text decoder besides the usual ones (e.g.
                    Qwen3-VL's DeepStack features); the routed decoder hands them to `after_layer` through the
                    prefill state, and refuses any other unknown input
    nuwa_variant:   which of Nüwa's released variants the family runs ("llava": a [CLS] tower merged in its
                    feature space before the projector; "qwen": a ViT whose patch merger is the projector); read
                    by the `nuwa` merge and by the `nuwa` method alike
    Options:        the family's own routing options (`RoutingConfig.family_options`), set on `self.options`

    The vision-tower hooks (`hook_vision_scores`, `hook_vision_features`, `hook_vision_keys`,
    `hook_projector_input`, `project_visual`, `image_token_id`) are declared here; a family that does not provide
    one raises NotImplementedError naming it, and `provides(name)` says whether a family overrides it.
    """

    kind = "model family"
    model_classes: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    box_frame: ClassVar[str] = "normalized"
    shapes: ClassVar[tuple[ModelShape, ...]] = ()
    decoder_inputs: ClassVar[frozenset[str]] = frozenset()
    nuwa_variant: ClassVar[str] = "llava"

    def __init__(self, model: nn.Module):
        self.model = model
        inner = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.inner = inner
        self.language_model: nn.Module = inner.language_model
        self.text_config = self.language_model.config
        layer_types = getattr(self.text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"visroute supports decoders with full attention in every layer; this model has layer types "
                f"{sorted(set(layer_types))}"
            )
        self._signature = inspect.signature(model.forward)
        self.options = self.build_options({})

    # ---- facts read off a config (no model needed) -------------------------------------------------------------
    @classmethod
    def visual_tokens(cls, config, height: int | None = None, width: int | None = None) -> int | None:
        """Visual tokens one image of height x width pixels gives; None when that depends on the image and no
        size is given."""
        raise NotImplementedError(f"{cls.__name__} does not say how many visual tokens an image gives")

    @classmethod
    def vision_flops(cls, config, images: list[ImageSpan]) -> tuple[int, int]:
        """(vision tower, projector) FLOPs of encoding `images` once each (2 FLOPs per multiply-add)."""
        raise NotImplementedError(f"{cls.__name__} has no vision FLOPs model")

    @classmethod
    def plain_prompt(cls, question: str, num_images: int, image_token: str | None = None) -> str:
        """The family's prompt format for a processor without a chat template."""
        raise NotImplementedError(f"{cls.__name__} has no prompt format")

    @classmethod
    def grounding_prompt(cls, expression: str) -> str:
        """The question that asks this family's checkpoints for the box of `expression` in their box frame (the
        default: lmms-eval's RefCOCO prompt, which asks for [0, 1] coordinates)."""
        return ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
                "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide "
                "the bounding box coordinate of the region this sentence describes: " + expression)

    @classmethod
    def build_config(cls, shape: ModelShape):
        """The transformers config (SDPA attention) of one of this family's bench shapes."""
        raise NotImplementedError(f"{cls.__name__} builds no bench shapes")

    @classmethod
    def model_class(cls, config) -> type[nn.Module]:
        """The class that builds a model from `config` (bench shapes)."""
        raise NotImplementedError(f"{cls.__name__} builds no bench shapes")

    @classmethod
    def synthetic_inputs(cls, config, text_tokens: int, height: int, width: int,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One prompt of `text_tokens` random text ids around one image's placeholders, with random pixels, as
        this family's processor would lay them out for a height x width image (bench inputs)."""
        raise NotImplementedError(f"{cls.__name__} builds no bench inputs")

    # ---- decoder structure -----------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.language_model.layers)

    def rope_function(self) -> Callable:
        """The model's own `apply_rotary_pos_emb`, found in the module that defines its attention class."""
        attn = self.layers[0].self_attn
        return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", _default_rope)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, L, head_dim) for the given (family-normalised) position ids."""
        return self.language_model.rotary_emb(hidden, position_ids)

    def after_layer(self, layer_index: int, hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                    state: Any) -> torch.Tensor:
        """Called after every decoder layer of a routed prefill (only when a family overrides it): `hidden`
        (B, C, D) is the layer's output over the compact sequence, `index` (B, C) the sequence position of each
        row (padding points at the dummy slot L), `valid` (B, C) its real rows; `state` holds the prefill's
        layout, the full buffer of carried states (`state.full`), the active visual tokens (`state.active`)
        and the family's decoder inputs (`state.decoder_kwargs`). Returns the hidden states the next layer
        reads. The default changes nothing."""
        return hidden

    def rope_position_ids(
        self, position_ids: torch.Tensor | None, batch: int, length: int, past: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids in the form this family's rotary embedding takes; when none were given, the same default
        the unmodified decoder would use (consecutive positions after the `past` cached tokens)."""
        raise NotImplementedError

    # ---- prompts and boxes ---------------------------------------------------------------------------------------
    def prompt(self, question: str, num_images: int = 1, processor: Any = None) -> str:
        """One user turn: `num_images` images (0: the blind control, the image removed), then `question`,
        ending with the generation prompt. The processor's chat template when it has one, else the family's
        plain format."""
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
            return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return self.plain_prompt(question, num_images, getattr(processor, "image_token", None))

    def image_frames(self, processor: Any, images: list, inputs: dict[str, Any],
                     box_frame: str | None = None) -> list[ImageFrame]:
        """One `ImageFrame` per image, in the order the processor received them, for `inputs` = the
        processor's output for `images` (PIL images). `box_frame` overrides the family's answer frame."""
        raise NotImplementedError(f"{type(self).__name__} does not place its token grid on the image")

    # ---- inputs ------------------------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}) or {})
        return out

    def install(self) -> None:
        """Hooks the adapter needs while routing (removed by `uninstall`)."""

    def uninstall(self) -> None:
        pass

    def capture(self, a: dict[str, Any]) -> CallInputs:
        """Read a top-level forward call (its arguments bound by name): input ids, which positions are visual,
        and each image's grid."""
        raise NotImplementedError

    def _visual_mask(self, a: dict[str, Any]) -> tuple[torch.Tensor | None, bool]:
        """The image-token mask of a bound call (None when it holds none), and whether images came with it."""
        input_ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
        if input_ids is not None:
            visual = input_ids == self.image_token_id
        elif embeds is not None:
            visual = self.visual_mask_from_embeds(embeds, self.image_token_id)
        else:
            visual = None
        encoded = a.get("mm_encoder_outputs") or {}
        images_given = a.get("pixel_values") is not None or encoded.get("image") is not None
        if visual is not None and not bool(visual.any()):
            if images_given:
                raise ValueError(
                    f"Images were given but the input holds no image token (id {self.image_token_id}); the "
                    "processor does not match the model. Use the processor saved with this model."
                )
            visual = None
        return visual, images_given

    def visual_mask_from_embeds(self, inputs_embeds: torch.Tensor, token_id: int) -> torch.Tensor:
        # Without input ids, placeholders are recognised by their embedding (as transformers itself does).
        emb = self.inner.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == emb).all(-1)

    # ---- vision tower --------------------------------------------------------------------------------------------
    def vision_attention_modules(self) -> list[nn.Module]:
        """The attention module of every layer of the vision tower, in order."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    def default_vision_layer(self) -> int:
        """The tower layer whose output the projector reads (the layer vision-attention scores default to)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    def vision_layer_index(self, layer: int | None) -> int:
        """`layer` as a 0-based tower layer (None: the default; negative: from the end)."""
        n = len(self.vision_attention_modules())
        index = self.default_vision_layer() if layer is None else int(layer)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise ValueError(f"Vision layer {layer} is outside the vision tower's layers 0..{n - 1}")
        return index

    def hook_vision_scores(self, layer: int | None, sink: Callable[[torch.Tensor], None]) -> list:
        """Hook tower layer `layer` so that, whenever the tower runs, one attention score per visual token of
        every image of that call ([CLS] attention, or the mean attention a patch receives for towers without
        [CLS]) is passed to `sink` as one flat fp32 tensor, in the order the images' tokens fill the batch's
        visual tokens. Returns the hook handles (call `.remove()` on each)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    def hook_vision_features(self, first: int, last: int, sink: Callable[[torch.Tensor], None]) -> list:
        """Hook tower layers `first`..`last` (0-based, inclusive) so that, whenever the tower runs, the mean of
        their outputs at each visual token is passed to `sink` as one flat (tokens, width) fp32 tensor in the
        batch's visual-token order. Returns the hook handles."""
        raise NotImplementedError(f"{type(self).__name__} does not provide hook_vision_features")

    def hook_vision_keys(self, layer: int | None, sink: Callable[[torch.Tensor], None]) -> list:
        """Hook tower layer `layer` so that, whenever the tower runs, each visual token's key at that layer,
        averaged over heads, is passed to `sink` as one flat (tokens, head_dim) fp32 tensor. Returns the hook
        handles."""
        raise NotImplementedError(f"{type(self).__name__} does not provide hook_vision_keys")

    def hook_projector_input(self, sink: Callable[[torch.Tensor], None]) -> list | None:
        """Hook the projector so that its input at each visual token (tower features) is passed to `sink` as one
        flat (tokens, width) tensor; returns the handles, or None where the family has no projector input per
        visual token (then tower-space merges and scorers use the decoder input embeddings)."""
        return None

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """The projector applied to tower features (..., tower width) -> decoder input embeddings (..., D)."""
        raise NotImplementedError(f"{type(self).__name__} does not provide project_visual")

    @property
    def image_token_id(self) -> int:
        """The id of the model's image placeholder token."""
        raise NotImplementedError(f"{type(self).__name__} does not provide image_token_id")

    @classmethod
    def provides(cls, name: str) -> bool:
        """Whether the family implements the declared hook `name` (overrides the base's)."""
        return getattr(cls, name, None) is not getattr(FamilyAdapter, name, None)

    # ---- layout --------------------------------------------------------------------------------------------------
    def layout(self, call: CallInputs, valid: torch.Tensor) -> VisualLayout:
        """Per sample, the sequence positions of its visual tokens and the images they belong to."""
        from visroute.tensors import compact_index

        visual = call.visual_mask.to(valid.device) & valid
        positions, pos_valid = compact_index(visual)  # (B, Nv), padded with the dummy index L
        images = self._assign_images(call, visual.sum(1).tolist())
        return VisualLayout(positions=positions, valid=pos_valid, images=images)

    def _assign_images(self, call: CallInputs, counts: list[int]) -> list[list[ImageSpan]]:
        spans: list[list[ImageSpan]] = []
        it = iter(zip(call.image_token_counts, call.image_grids))
        for n in counts:
            sample, offset = [], 0
            while offset < n:
                try:
                    length, (rows, cols, frames) = next(it)
                except StopIteration:
                    raise ValueError(
                        "The visual tokens in the input do not match the images given: a sample holds more "
                        "image placeholder tokens than the image features account for. Use the processor "
                        "that belongs to this model."
                    ) from None
                sample.append(ImageSpan(offset, length, rows, cols, frames))
                offset += length
            if offset != n:
                raise ValueError(
                    "The visual tokens of a sample do not split into whole images; the processor and the model "
                    "disagree on the number of tokens per image."
                )
            spans.append(sample)
        return spans


# ---- vision-tower attention scores ------------------------------------------------------------------------------
# Used by the vision-attention scorer: each family hooks one attention layer of its tower and computes, from that
# layer's own q/k, one score per visual token. Only the needed query rows are computed, a chunk at a time, in fp32.


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the [CLS] query to every token, summed over heads: q_cls (N, H, hd), k (N, H, T, hd) ->
    (N, T) fp32."""
    logits = torch.einsum("nhd,nhtd->nht", q_cls.float(), k.float()) * scale
    return torch.softmax(logits, dim=-1).sum(1)


def mean_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """For packed tokens that attend only within their segment (`cu_seqlens`: segment boundaries, as the
    Qwen ViT takes them), the attention each token receives, summed over heads and averaged over the queries
    of its segment:  r_j = 1/n_seg * sum_{i in seg(j)} sum_h softmax_k(q_h(i) . k_h(k) * scale)[j].

    q, k: (S, H, hd). Returns (S,) fp32. Segments are padded into one batch; query rows go a chunk at a time."""
    from visroute.tensors import CHUNK_ELEMENTS

    s, heads, head_dim = q.shape
    device = q.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    n_seg, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    seg = torch.repeat_interleave(torch.arange(n_seg, device=device), lengths)
    slot = torch.arange(s, device=device) - cu[:-1][seg]
    index = torch.full((n_seg, longest), s, dtype=torch.long, device=device)
    index[seg, slot] = torch.arange(s, device=device)
    valid = index < s

    def by_segment(x: torch.Tensor) -> torch.Tensor:  # (S, H, hd) -> (n_seg, H, longest, hd), zero padded
        return torch.cat([x.float(), x.new_zeros(1, heads, head_dim).float()])[index].transpose(1, 2)

    qp, kp = by_segment(q) * scale, by_segment(k)
    received = torch.zeros(n_seg, longest, dtype=torch.float32, device=device)
    rows = max(1, CHUNK_ELEMENTS // max(1, n_seg * heads * longest))
    for start in range(0, longest, rows):
        logits = torch.einsum("shqd,shkd->shqk", qp[:, :, start : start + rows], kp)
        logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        del logits
        # padded query rows do not count
        received += torch.einsum("shqk,sq->sk", probs, valid[:, start : start + rows].float())
    received = received / lengths.clamp(min=1)[:, None].float()
    return received[valid]  # segments in order, tokens in order: the packed order again


def hook_mean_of_outputs(modules, first: int, last: int, finish: Callable[[torch.Tensor], None]) -> list:
    """Forward hooks on `modules[first..last]` (inclusive, run in that order) so that, whenever they run, the mean
    of their outputs (fp32) is handed to `finish` (e.g. Nüwa's similarity features over a range of tower layers).
    Returns the hook handles."""
    n = len(modules)
    if not 0 <= first <= last < n:
        raise ValueError(f"Vision feature layers {first}..{last} are outside the tower's layers 0..{n - 1}")
    total: dict[str, torch.Tensor] = {}

    def add(index: int):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).float()
            total["sum"] = h if index == first else total["sum"] + h
            if index == last:
                finish(total.pop("sum") / (last - first + 1))
        return hook

    return [modules[i].register_forward_hook(add(i)) for i in range(first, last + 1)]


def bidirectional_attention_flops(n: int, dim: int) -> int:
    """FLOPs of full (non-causal) attention over n tokens of width `dim`: scores and the weighted sum."""
    return 4 * n * n * dim


__all__ = ["BOX_FRAMES", "CallInputs", "FamilyAdapter", "ImageFrame", "ModelShape", "TiledImageFrame", "TiledImageSpan",
           "TokenGrid", "processor_view_box",
           "cls_attention", "mean_attention_received", "bidirectional_attention_flops"]

"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`):
any-resolution tiling. The processor cuts each image into tiles of the tower's input size: a base tile (the whole
image squashed to one tile) and the tiles of the best-fitting grid resolution; the tower encodes every tile, and
`pack_image_features` lays the features out as

    base tile (side x side tokens) | unpadded high-resolution map (H' rows of W' tokens, each row ending in a newline
    token, the learned `image_newline` vector)

where the high-resolution map is the tiles' features stitched together with the processor's padding cut away
(and, on OneVision, bilinearly downsampled when it holds more than `anyres_max_N` tiles' worth). Every one of these
positions is an `<image>` placeholder, newline tokens included: they are all visual tokens.

* Layout: each image gives two `TiledImageSpan`s, the base tile (side x side) and the high-resolution map
  (H' x (W' + 1): its last column the newline tokens); a OneVision image of a multi-image sample is not tiled and
  gives its base tile and one newline token (a 1 x 1 span, all newline column). The family option
  `keep_newlines` pins the newline tokens (always active, never candidates; they count towards each stage's
  keep).
* Vision-tower scores ([CLS] attention for CLIP towers, attention received for SigLIP towers, which have no
  [CLS]) are computed per tile and laid out exactly as the features are: through the model's own
  `pack_image_features`, so tiles, unpadding and OneVision's bilinear downsampling apply to them as to the
  features. A newline token scores 0 (it shows no patch).
* Boxes: `image_frames` gives `TiledImageFrame`s, whose `tokens_of` maps a box onto the tokens of both grids.
* A Mistral decoder sets `sliding_window` without `layer_types`; the routed decoder builds full causal masks, so
  it refuses a sequence longer than the window instead of ignoring the window.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass

import torch

from visroute.families.base import (
    CallInputs,
    ModelShape,
    TiledImageFrame,
    TiledImageSpan,
    TokenGrid,
    bidirectional_attention_flops,
)
from visroute.families.llava import LlavaAdapter
from visroute.options import option
from visroute.record import VisualLayout

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class ImageParts:
    """How one image's visual tokens split: the base tile's side, the high-resolution map's rows x cols (None for an
    untiled image, which ends in one newline token) and the tiles the tower ran."""

    side: int
    rows: int | None
    cols: int | None
    tiles: int

    @property
    def length(self) -> int:
        hires = 1 if self.rows is None else self.rows * (self.cols + 1)
        return self.side * self.side + hires

    def newline_offsets(self) -> list[int]:
        """Offsets (within the image's tokens) of its newline tokens."""
        base = self.side * self.side
        if self.rows is None:
            return [base]
        return [base + r * (self.cols + 1) + self.cols for r in range(self.rows)]

    def spans(self, offset: int) -> list[TiledImageSpan]:
        base = self.side * self.side
        first = TiledImageSpan(offset, base, self.side, self.side, 1, tiles=self.tiles)
        if self.rows is None:  # the lone newline token: a 1 x 1 grid that is all newline column
            return [first, TiledImageSpan(offset + base, 1, 1, 1, 1, newline_column=True)]
        return [first, TiledImageSpan(offset + base, self.rows * (self.cols + 1), self.rows, self.cols + 1, 1,
                                      newline_column=True)]


def _grid_modules(config):
    """The model module's layout functions (select the best resolution, unpad)."""
    if config.model_type == "llava_onevision":
        from transformers.models.llava_onevision import modeling_llava_onevision as m
    else:
        from transformers.models.llava_next import modeling_llava_next as m
    return m


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    model_types = ("llava_next",)
    # LLaVA-NeXT writes boxes in [0, 1] over the image: anyres keeps the aspect ratio and pads nothing the model sees
    box_frame = "normalized"
    shapes = (
        ModelShape("llava-next-7b", "llava_next",
                   dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
                   dict(_CLIP_L_336, image_grid_pinpoints=_NEXT_PINPOINTS),
                   "LLaVA-NeXT-7B (v1.6 Vicuna): CLIP ViT-L/14-336 on 336 px tiles, 2-layer MLP projector, "
                   "Vicuna-7B decoder", aliases=("llava-next", "llava-1.6-7b"), tiers=(640, 320, 160)),
        ModelShape("llava-next-tiny", "llava_next",
                   dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=32,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=96, patch_size=4, projection_dim=32,
                        image_grid_pinpoints=[[96, 192], [192, 96], [192, 192], [288, 96], [96, 288]]),
                   "LLaVA-NeXT layout, tiny widths (tests): 32 layers, 96 px tiles of 24 x 24 tokens",
                   tiers=(640, 320, 160)),
    )

    @dataclass(frozen=True)
    class Options:
        keep_newlines: bool = option(False, "keep the newline tokens at the end of each row of the high-resolution "
                                            "map always active (they count towards each stage's keep)")

    def __init__(self, model):
        super().__init__(model)
        cfg = self.model.config
        vc = cfg.vision_config
        has_cls = hasattr(self._vision_model().embeddings, "class_embedding")
        if has_cls != (cfg.vision_feature_select_strategy == "default"):
            fed = "[CLS] and the patches" if has_cls else "the patches but one"
            raise ValueError(
                f"This {type(model).__name__} feeds the projector {fed} "
                f"(vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}): its tiles' features form "
                f"no {vc.image_size // vc.patch_size} x {vc.image_size // vc.patch_size} grid, which visroute lays out"
            )
        self._window = None
        window, types = getattr(self.text_config, "sliding_window", None), getattr(self.text_config, "layer_types", None)
        if window is not None and not types:
            self._window = int(window)  # Mistral: a window without layer types
        self._wrapped = None
        self._call_images: list[tuple[tuple[int, int], bool]] | None = None  # (size, tiled) per image, latest call
        self._parts_of_features: dict[int, tuple[weakref.ref, ImageParts]] = {}

    # ---- facts read off a config -------------------------------------------------------------------------------
    @classmethod
    def image_parts(cls, config, height: int, width: int, tiled: bool = True) -> ImageParts:
        """How the visual tokens of a height x width image split (`tiled=False`: an image OneVision does not tile,
        one of several in a sample)."""
        side = cls._side(config)
        if not tiled:
            return ImageParts(side, None, None, 1)
        m = _grid_modules(config)
        tile = config.vision_config.image_size
        nph, npw = m.get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, tile)
        rows, cols = m.unpad_image(torch.empty(0, nph * side, npw * side), (height, width)).shape[1:]
        rows, cols = cls._downsampled(config, rows, cols, side)
        tiles = m.image_size_to_num_patches((height, width), config.image_grid_pinpoints, tile)
        return ImageParts(side, int(rows), int(cols), int(tiles))

    @classmethod
    def _downsampled(cls, config, rows: int, cols: int, side: int) -> tuple[int, int]:
        return rows, cols

    @classmethod
    def visual_tokens(cls, config, height=None, width=None) -> int | None:
        if height is None or width is None:
            return None  # the count depends on the image
        return cls.image_parts(config, height, width).length

    @classmethod
    def vision_flops(cls, config, images) -> tuple[int, int]:
        tiles = sum(getattr(span, "tiles", 0) for span in images)
        if images and not tiles:
            raise ValueError("The record holds no tiled image spans; their vision FLOPs cannot be counted")
        # one tower pass and one projector pass per tile: LLaVA-1.5's count per image
        return super().vision_flops(config, [None] * tiles)

    @classmethod
    def plain_prompt(cls, question, num_images, image_token=None) -> str:
        # LLaVA-NeXT Vicuna's conversation format, with its system prompt
        system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions.")
        return f"{system} USER: " + f"{image_token or '<image>'}\n" * num_images + question + " ASSISTANT:"

    @classmethod
    def build_config(cls, shape):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        vision = dict(shape.vision)
        pinpoints = vision.pop("image_grid_pinpoints")
        text = LlamaConfig(**shape.text, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        image_id = 32000 if text.vocab_size > 32000 else text.vocab_size - 2
        return LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=image_id,
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", projector_hidden_act="gelu",
                               tie_word_embeddings=False)

    @classmethod
    def model_class(cls, config):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def synthetic_inputs(cls, config, text_tokens, height, width, generator):
        parts = cls.image_parts(config, height, width)
        text = torch.randint(3, max(4, min(config.text_config.vocab_size, config.image_token_id) - 8), (text_tokens,),
                             generator=generator).tolist()
        head, tail = text[: min(8, text_tokens // 4)], text[min(8, text_tokens // 4):]
        ids = [1] + head + [config.image_token_id] * parts.length + tail
        tile = config.vision_config.image_size
        pixels = torch.randn(1, parts.tiles, 3, tile, tile, generator=generator)
        return {"input_ids": torch.tensor([ids]), "pixel_values": pixels,
                "image_sizes": torch.tensor([[height, width]])}

    # ---- a model -----------------------------------------------------------------------------------------------
    def tokens_per_image(self) -> int:
        raise NotImplementedError("LLaVA-NeXT's visual tokens per image depend on the image's size (image_parts)")

    def _tiled(self, n_images: int, batch_num_images) -> list[bool]:
        return [True] * n_images

    def _pack(self, features: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor):
        cfg = self.model.config
        return self.inner.pack_image_features(features, sizes, cfg.vision_feature_select_strategy,
                                              image_newline=newline)[0]

    def install(self) -> None:
        # `generate` encodes the images before the prefill and drops `image_sizes` from the forward call: the
        # layout of each image is read where the features are made, and kept with the feature tensors (which
        # `generate` passes on, repeated for beams, as they are).
        original = self.inner.get_image_features
        signature = inspect.signature(original)
        had_own = "get_image_features" in self.inner.__dict__

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(bound["image_sizes"]).tolist()]
            tiled = self._tiled(len(sizes), bound.get("batch_num_images"))
            self._call_images = list(zip(sizes, tiled))
            out = original(*args, **kwargs)
            self._parts_of_features = {}
            for feature, size, t in zip(out.pooler_output, sizes, tiled):
                parts = self.image_parts(self.model.config, *size, tiled=t)
                if int(feature.shape[0]) == parts.length:
                    self._parts_of_features[id(feature)] = (weakref.ref(feature), parts)
            return out

        self._wrapped = (original, had_own)
        self.inner.get_image_features = get_image_features

    def uninstall(self) -> None:
        if self._wrapped is not None:
            original, had_own = self._wrapped
            if had_own:
                self.inner.get_image_features = original
            else:
                del self.inner.get_image_features
            self._wrapped = None

    def _known_parts(self, feature: torch.Tensor) -> ImageParts | None:
        entry = self._parts_of_features.get(id(feature))
        if entry is None or entry[0]() is not feature:
            return None
        return entry[1]

    def capture(self, a: dict) -> CallInputs:
        visual, images_given = self._visual_mask(a)
        self._refuse_videos(a)
        parts: list[ImageParts] = []
        if visual is not None:
            encoded = (a.get("mm_encoder_outputs") or {}).get("image")
            if encoded is not None:
                parts = [self._known_parts(f) for f in encoded.pooler_output]
                if any(p is None for p in parts):
                    raise ValueError(
                        "The image features were passed in pre-computed; visroute lays out LLaVA-NeXT's tiles from "
                        "the image sizes, which it reads when the model computes the features: pass pixel_values "
                        "and image_sizes"
                    )
            elif a.get("pixel_values") is not None:
                if a.get("image_sizes") is None:
                    raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
                sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(a["image_sizes"]).tolist()]
                tiled = self._tiled(len(sizes), a.get("batch_num_images"))
                parts = [self.image_parts(self.model.config, *s, tiled=t) for s, t in zip(sizes, tiled)]
            total = int(visual.sum())
            if sum(p.length for p in parts) != total:
                raise ValueError(
                    f"The input holds {total} image tokens but the images' tiles give {sum(p.length for p in parts)}; "
                    "the processor does not match the model (image_grid_pinpoints, tile size)."
                )
        extras = dict(a, _image_parts=parts)
        return CallInputs(a.get("input_ids"), visual, [p.length for p in parts], [(None, None, 1)] * len(parts),
                          images_given, extras)

    def _refuse_videos(self, a: dict) -> None:
        pass

    def layout(self, call: CallInputs, valid: torch.Tensor) -> VisualLayout:
        out = super().layout(call, valid)  # one span per image
        parts = iter(call.extras["_image_parts"])
        pinned = torch.zeros_like(out.valid)
        images = []
        for b, spans in enumerate(out.images):
            sample = []
            for span in spans:
                p = next(parts)
                sample += p.spans(span.offset)
                pinned[b, [span.offset + o for o in p.newline_offsets()]] = True
            images.append(sample)
        return VisualLayout(positions=out.positions, valid=out.valid, images=images,
                            pinned=pinned if self.options.keep_newlines else None)

    def rope_position_ids(self, position_ids, batch, length, past, device):
        if self._window is not None and past + length > self._window:
            raise ValueError(
                f"This decoder attends within a sliding window of {self._window} tokens (Mistral's sliding_window), "
                f"which the routed decoder does not apply; the sequence reaches {past + length} tokens. Route "
                "sequences (prompt and generated tokens) of at most the window, or set text_config.sliding_window "
                "= None if the checkpoint was trained without it."
            )
        return super().rope_position_ids(position_ids, batch, length, past, device)

    def image_frames(self, processor, images, inputs, box_frame=None):
        sizes = inputs.get("image_sizes")
        if sizes is None or len(sizes) != len(images):
            raise ValueError(f"{len(images)} images need as many rows of image_sizes in the processor's output")
        tiled = self._tiled(len(images), inputs.get("batch_num_images"))
        return [self._frame(im.size, tuple(int(v) for v in s), t, box_frame or self.box_frame)
                for im, s, t in zip(images, torch.as_tensor(sizes).tolist(), tiled)]

    def _frame(self, image_size, hw, tiled, box_frame) -> TiledImageFrame:
        """The frame of one image: the base tile over the whole image (squashed), then the high-resolution map over
        the part of the image the unpadded tiles show (in original pixels), or for an untiled image its base
        tile over the square the processor padded it to."""
        cfg = self.model.config
        width, height = image_size
        if (height, width) != hw:
            raise ValueError(f"The image is {height} x {width} but the processor's image_sizes says {hw[0]} x {hw[1]}")
        parts = self.image_parts(cfg, height, width, tiled)
        side = parts.side
        whole = (0.0, 0.0, float(width), float(height))
        if parts.rows is None:
            big = max(width, height)
            x0, y0 = -float((big - width) // 2), -float((big - height) // 2)
            base = TokenGrid(0, side, side, (x0, y0, x0 + big, y0 + big), side)
            return TiledImageFrame(width, height, whole, side, side, (width, height), box_frame, grids=(base,),
                                   tokens=parts.length)
        m = _grid_modules(cfg)
        best_h, best_w = m.select_best_resolution((height, width), cfg.image_grid_pinpoints)
        # the image as resized into the best resolution (aspect kept), centred in it
        if best_w / width < best_h / height:
            new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
        paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        tile = cfg.vision_config.image_size
        full_h, full_w = best_h // tile * side, best_w // tile * side  # token grid of all tiles
        kept_h, kept_w = m.unpad_image(torch.empty(0, full_h, full_w), (height, width)).shape[1:]
        pad_r, pad_c = (full_h - kept_h) // 2, (full_w - kept_w) // 2
        px = tile / side  # pixels of the best resolution per token
        view = ((pad_c * px - paste_x) * width / new_w, (pad_r * px - paste_y) * height / new_h,
                ((full_w - pad_c) * px - paste_x) * width / new_w, ((full_h - pad_r) * px - paste_y) * height / new_h)
        grids = (TokenGrid(0, side, side, whole, side),
                 TokenGrid(side * side, parts.rows, parts.cols, view, parts.cols + 1))
        return TiledImageFrame(width, height, whole, parts.rows, parts.cols, (new_w, new_h), box_frame, grids=grids,
                               tokens=parts.length)

    # ---- vision tower ------------------------------------------------------------------------------------------
    def _laid_out(self, sink):
        """A sink for LLaVA-1.5's per-tile hooks (one row per patch of every tile of the tower call, flat or with a
        feature dimension) that passes `sink` the rows laid out as the features are: the tiles' maps go through
        the model's own `pack_image_features` (stitched, unpadded, on OneVision downsampled), newline tokens 0."""

        def relayout(flat: torch.Tensor) -> None:
            images = self._call_images
            if images is None:
                return  # a tower call that did not come through get_image_features: its layout is unknown
            side = self._side(self.model.config)
            parts = [self.image_parts(self.model.config, *size, tiled=t) for size, t in images]
            per_tile = flat.reshape(-1, side * side, 1 if flat.dim() == 1 else flat.shape[-1])
            if per_tile.shape[0] != sum(p.tiles for p in parts):
                return
            sizes = torch.tensor([size for size, _ in images])
            zero = per_tile.new_zeros(per_tile.shape[-1])
            packed = torch.cat(self._pack(list(per_tile.split([p.tiles for p in parts])), sizes, zero))
            sink(packed[:, 0] if flat.dim() == 1 else packed)

        return relayout

    def hook_vision_scores(self, layer, sink):
        """LLaVA-1.5's per-tile scores ([CLS] attention, or attention received for towers without [CLS]), laid
        out as the features are (`_laid_out`); newline tokens score 0 (they show no patch)."""
        return super().hook_vision_scores(layer, self._laid_out(sink))

    def hook_vision_features(self, first, last, sink):
        """LLaVA-1.5's per-tile mean tower features, laid out as the features are; newline tokens get zeros."""
        return super().hook_vision_features(first, last, self._laid_out(sink))

    def hook_vision_keys(self, layer, sink):
        """LLaVA-1.5's per-tile keys averaged over heads, laid out as the features are; newline tokens get zeros."""
        return super().hook_vision_keys(layer, self._laid_out(sink))

    def hook_projector_input(self, sink):
        """Newline tokens never pass the projector and OneVision interpolates after it: there is no projector
        input per visual token, so merges act on the decoder input embeddings (None, as for Qwen)."""
        return None


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's layout with a SigLIP tower (no [CLS]: scores are the attention each patch
    receives within its tile), a Qwen2 decoder, the high-resolution map bilinearly downsampled to about
    `anyres_max_N` tiles' worth, and the images of a multi-image sample untiled (base tile and one newline token).
    Videos are refused while routing."""

    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    model_types = ("llava_onevision",)
    # the model hands `logits_to_keep` on to its text decoder, which does not use it (the model slices the
    # decoder's output itself): routing takes it and leaves it unused too
    decoder_inputs = frozenset({"logits_to_keep"})
    shapes = ()

    @classmethod
    def _downsampled(cls, config, rows, cols, side):
        # pack_image_features: beyond 1.1 x `anyres_max_N` tiles' worth, interpolated down to about N tiles' worth
        most = int(config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * side ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    @classmethod
    def vision_flops(cls, config, images) -> tuple[int, int]:
        vc = config.vision_config
        tiles = sum(getattr(span, "tiles", 0) for span in images)
        if images and not tiles:
            raise ValueError("The record holds no tiled image spans; their vision FLOPs cannot be counted")
        n = (vc.image_size // vc.patch_size) ** 2  # SigLIP: patches only, no [CLS]
        d, m = vc.hidden_size, vc.intermediate_size
        per_layer = 2 * n * (4 * d * d + 2 * d * m) + bidirectional_attention_flops(n, d)
        tower = 2 * (3 * vc.patch_size ** 2) * d * n + vc.num_hidden_layers * per_layer
        if getattr(vc, "vision_use_head", False):  # attention pooling: one probe query, then an MLP on it
            tower += 2 * n * 2 * d * d + 4 * n * d + 2 * (2 * d * d + 2 * d * m)
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        t = config.text_config.hidden_size
        projector = 2 * n * (d * layers * t + t * t)
        return tower * tiles, projector * tiles

    @classmethod
    def plain_prompt(cls, question, num_images, image_token=None) -> str:
        # the chat format of the released checkpoints' template (Qwen2's)
        return ("<|im_start|>user\n" + f"{image_token or '<image>'}\n" * num_images + question
                + "<|im_end|>\n<|im_start|>assistant\n")

    @classmethod
    def model_class(cls, config):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def build_config(cls, shape):
        raise NotImplementedError("No LLaVA-OneVision bench shape is defined")

    def _tiled(self, n_images, batch_num_images):
        # the processor tiles an image only when it is its sample's only image (`batch_num_images`)
        if batch_num_images is None:
            return [True] * n_images
        return [int(n) == 1 for n in torch.as_tensor(batch_num_images).tolist() for _ in range(int(n))]

    def _pack(self, features, sizes, newline):
        return self.inner.pack_image_features(features, sizes, image_newline=newline,
                                              vision_aspect_ratio=self.model.config.vision_aspect_ratio)[0]

    def _refuse_videos(self, a: dict) -> None:
        ids = a.get("input_ids")
        video_ids = ids is not None and bool((ids == self.model.config.video_token_id).any())
        if a.get("pixel_values_videos") is not None or (a.get("mm_encoder_outputs") or {}).get("video") is not None \
                or video_ids:
            raise ValueError(
                "visroute routes LLaVA-OneVision's image tokens only: video inputs (pixel_values_videos, video "
                "tokens) are not supported while routing. Remove the router (router.remove()) to run videos."
            )

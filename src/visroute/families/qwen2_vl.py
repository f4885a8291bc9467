"""Qwen2-VL and Qwen2.5-VL: a ViT with 2x2 patch merging and a Qwen2 decoder with 3-D M-RoPE. The image-pad
tokens between vision-start and vision-end are the visual tokens; each image has its own (t, h, w) grid."""

from __future__ import annotations

import sys

import torch

from visroute.families.base import (
    CallInputs,
    FamilyAdapter,
    ImageFrame,
    ModelShape,
    bidirectional_attention_flops,
    hook_mean_of_outputs,
    mean_attention_received,
)

# The image processor settings the released Qwen2-VL / Qwen2.5-VL checkpoints ship (preprocessor_config.json).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 12845056
_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
_TOKEN_IDS = (151655, 151656, 151652, 151653)  # image pad, video pad, vision start, vision end


def resized_size(height: int, width: int, patch: int = 14, merge: int = 2, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) Qwen's image processor resizes an image to: each side a multiple of patch x merge, the
    area within [min_pixels, max_pixels] (transformers' own `smart_resize`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)


def _window_sizes(rows: int, cols: int, window: int) -> list[int]:
    """Tokens (in merged units) of each attention window of a rows x cols grid cut into window x window tiles."""
    out = []
    for r in range(0, rows, window):
        for c in range(0, cols, window):
            out.append(min(window, rows - r) * min(window, cols - c))
    return out


class Qwen2VLAdapter(FamilyAdapter):
    name = "qwen2_vl"
    nuwa_variant = "qwen"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    model_types = ("qwen2_vl",)
    box_frame = "scale_1000"  # Qwen2-VL writes (x, y) in [0, 1000) over the image
    windowed_tower = False

    def __init__(self, model):
        super().__init__(model)
        self._tower_hook = None
        self._last_grid_thw: torch.Tensor | None = None

    # ---- facts read off a config -------------------------------------------------------------------------------
    @classmethod
    def visual_tokens(cls, config, height=None, width=None, min_pixels: int = MIN_PIXELS,
                      max_pixels: int = MAX_PIXELS) -> int | None:
        if height is None or width is None:
            return None  # the count depends on the image
        vc = config.vision_config
        h, w = resized_size(height, width, vc.patch_size, vc.spatial_merge_size, min_pixels, max_pixels)
        factor = vc.patch_size * vc.spatial_merge_size
        return (h // factor) * (w // factor)

    @classmethod
    def _tower_dims(cls, vc) -> tuple[int, int, int]:
        """(width, output width, MLP FLOPs per patch) of the ViT."""
        return vc.embed_dim, vc.hidden_size, 2 * 2 * vc.embed_dim * int(vc.embed_dim * vc.mlp_ratio)

    @classmethod
    def vision_flops(cls, config, images) -> tuple[int, int]:
        vc = config.vision_config
        merge, unit = vc.spatial_merge_size, vc.spatial_merge_size ** 2
        d, out_dim, mlp = cls._tower_dims(vc)
        patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        windowed = cls.windowed_tower
        full_blocks = set(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth)) if windowed else set(range(vc.depth))
        window = vc.window_size // merge // vc.patch_size if windowed else 0
        tower = projector = 0
        for img in images:
            if img.rows is None or img.cols is None:
                raise ValueError("The record holds an image without a patch grid; its vision FLOPs cannot be counted")
            per_frame = img.rows * img.cols * unit
            p = img.frames * per_frame
            linear = 2 * p * (3 * d * d + d * d) + p * mlp
            full = img.frames * bidirectional_attention_flops(per_frame, d)
            local = img.frames * sum(bidirectional_attention_flops(w * unit, d)
                                     for w in _window_sizes(img.rows, img.cols, window)) if window else full
            tower += 2 * patch_in * d * p
            for b in range(vc.depth):
                tower += linear + (full if b in full_blocks else local)
            dm = d * unit
            projector += 2 * (p // unit) * (dm * dm + dm * out_dim)
        return tower, projector

    @classmethod
    def plain_prompt(cls, question, num_images, image_token=None) -> str:
        # the chat format the released checkpoints' templates render, with their default system prompt
        image = "<|vision_start|>" + (image_token or "<|image_pad|>") + "<|vision_end|>"
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + image * num_images + question + "<|im_end|>\n<|im_start|>assistant\n")

    @classmethod
    def grounding_prompt(cls, expression: str) -> str:
        # Qwen's grounding prompt; lmms-eval's "[0, 1] floats" wording makes Qwen2.5-VL answer wrongly
        return f"Locate {expression} in this image and output the bbox coordinates in JSON format."

    @classmethod
    def model_class(cls, config):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    @classmethod
    def build_config(cls, shape):
        t = dict(shape.text)
        section, tie = t.pop("mrope_section"), t.pop("tie_word_embeddings")
        vocab = t["vocab_size"]
        ids = _TOKEN_IDS if vocab > max(_TOKEN_IDS) else tuple(range(vocab - 6, vocab - 2))
        text = dict(t, rms_norm_eps=1e-6, max_position_embeddings=128000, tie_word_embeddings=tie,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return cls._config_class()(text_config=text, vision_config=dict(shape.vision), image_token_id=ids[0],
                                   video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3],
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)

    @classmethod
    def synthetic_inputs(cls, config, text_tokens, height, width, generator):
        vc = config.vision_config
        special = min(config.image_token_id, config.vision_start_token_id)
        text = torch.randint(3, max(4, min(config.text_config.vocab_size, special) - 8), (text_tokens,),
                             generator=generator).tolist()
        head, tail = text[: min(8, text_tokens // 4)], text[min(8, text_tokens // 4):]
        rh, rw = resized_size(height, width, vc.patch_size, vc.spatial_merge_size)
        h, w = rh // vc.patch_size, rw // vc.patch_size
        n = (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
        ids = [1] + head + [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id] + tail
        types = [0] * (len(head) + 2) + [1] * n + [0] * (len(tail) + 1)
        patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
        return {"input_ids": torch.tensor([ids]), "mm_token_type_ids": torch.tensor([types]),
                "pixel_values": torch.randn(h * w, patch_dim, generator=generator),
                "image_grid_thw": torch.tensor([[1, h, w]])}

    # ---- a model -----------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def install(self) -> None:
        # `generate` encodes the images before the prefill and drops `image_grid_thw` from the forward call,
        # so the grids are read where the tower is called.
        def remember_grid(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self._last_grid_thw = grid

        self._tower_hook = self.inner.visual.register_forward_pre_hook(remember_grid, with_kwargs=True)

    def uninstall(self) -> None:
        if self._tower_hook is not None:
            self._tower_hook.remove()
            self._tower_hook = None

    def rope_position_ids(self, position_ids, batch, length, past, device):
        # The same normalisation as the Qwen text model: 3 rows (t, h, w); a leading 4th row of plain text
        # positions (added by `generate`) is only used for packed masks, which routing builds itself.
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, position_ids.shape[0], -1)
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids

    def image_frames(self, processor, images, inputs, box_frame=None):
        grids = inputs.get("image_grid_thw")
        if grids is None or len(grids) != len(images):
            raise ValueError(f"{len(images)} images need as many rows of image_grid_thw in the processor's output")
        patch, m = self.model.config.vision_config.patch_size, self.merge_size
        frames = []
        for im, (_, h, w) in zip(images, grids.tolist()):
            # the processor resizes the whole image (no crop, no pad): the grid covers all of it
            frames.append(ImageFrame(width=im.size[0], height=im.size[1], view=(0.0, 0.0, float(im.size[0]), float(im.size[1])),
                                     rows=h // m, cols=w // m, canvas=(w * patch, h * patch),
                                     box_frame=box_frame or self.box_frame))
        return frames

    def capture(self, a: dict) -> CallInputs:
        visual, images_given = self._visual_mask(a)
        counts, grids = [], []
        if visual is not None:
            total = int(visual.sum())
            grid_thw = a.get("image_grid_thw")
            if grid_thw is None:
                grid_thw = self._last_grid_thw
            m = self.merge_size
            if grid_thw is not None:
                for t, h, w in grid_thw.tolist():
                    counts.append(t * (h // m) * (w // m))
                    grids.append((h // m, w // m, t))
            if sum(counts) != total:
                encoded = (a.get("mm_encoder_outputs") or {}).get("image")
                if encoded is None:
                    raise ValueError(
                        f"The input holds {total} image tokens but the image grids account for {sum(counts)}; "
                        "the processor does not match the model."
                    )
                counts = [int(f.shape[0]) for f in encoded.pooler_output]  # features known, grids not
                grids = [(None, None, 1)] * len(counts)
        return CallInputs(a.get("input_ids"), visual, counts, grids, images_given, a)

    # ---- vision tower ------------------------------------------------------------------------------------------
    def vision_attention_modules(self):
        return [block.attn for block in self.inner.visual.blocks]

    def default_vision_layer(self) -> int:
        return len(self.inner.visual.blocks) - 1  # the merger reads the last block's output

    def hook_vision_scores(self, layer, sink):
        """The ViT has no [CLS]: each patch scores the attention it receives, summed over heads and averaged
        over the queries it is visible to at that layer (its image in full-attention blocks, its window in
        Qwen2.5-VL's windowed blocks, exactly the `cu_seqlens` the block runs with). A visual token is a 2x2
        merge of patches: it scores the mean of its patches. Qwen2.5-VL orders the merge units by window before
        the blocks; the scores are put back in token order as the tower does with its output."""
        tower = self.inner.visual
        attn = self.vision_attention_modules()[self.vision_layer_index(layer)]
        unit = tower.spatial_merge_size ** 2
        windowed = getattr(tower, "window_size", None) is not None
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")
        if windowed:
            from transformers.vision_utils import get_vision_window_index

        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            s = x.shape[0]
            q, k, _ = module.qkv(x).float().reshape(s, 3, module.num_heads, -1).unbind(1)  # (S, H, hd)
            cos, sin = kwargs["position_embeddings"]
            q, k = rope(q, k, cos, sin)
            per_patch = mean_attention_received(q, k, module.scaling, kwargs["cu_seqlens"])
            per_unit = per_patch.view(-1, unit).mean(1)  # in the order the blocks run: by window for Qwen2.5-VL
            if windowed:
                # the grid of this tower call, remembered by the tower hook `install` put in place
                window_index, _ = get_vision_window_index(self._last_grid_thw, tower.spatial_merge_size,
                                                          tower.window_size, tower.patch_size)
                per_unit = torch.empty_like(per_unit).index_copy_(0, window_index.to(per_unit.device), per_unit)
            sink(per_unit.detach())

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]


    # ---- vision-tower features (merges) ------------------------------------------------------------------------
    def _units_in_token_order(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Rows per merge unit in the order the blocks run them (by window for Qwen2.5-VL) -> token order, as the
        tower puts its output back (the grid of the latest tower call, remembered by `install`'s hook)."""
        tower = self.inner.visual
        if getattr(tower, "window_size", None) is None:
            return per_unit
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(self._last_grid_thw, tower.spatial_merge_size, tower.window_size,
                                                  tower.patch_size)
        return torch.empty_like(per_unit).index_copy_(0, window_index.to(per_unit.device), per_unit)

    def hook_vision_features(self, first: int, last: int, sink):
        """Hook ViT blocks `first`..`last` (0-based, inclusive) so that, whenever the tower runs, the patch merger
        applied to the mean of their outputs (Nüwa's Qwen2.5-VL similarity features, in the decoder's space) is
        passed to `sink` as one flat (visual tokens, D) fp32 tensor in token order. Returns the hook handles."""
        tower = self.inner.visual

        def finish(mean: torch.Tensor) -> None:
            weight = next(tower.merger.parameters())
            merged = tower.merger(mean.to(weight.dtype)).float()  # (units, D), in the blocks' order
            sink(self._units_in_token_order(merged).detach())

        return hook_mean_of_outputs(tower.blocks, first, last, finish)

    def hook_projector_input(self, sink):
        """Qwen's patch merger is its projector and merges act on its output, the decoder input embeddings: there
        is nothing to hook before it (None)."""
        return None

    def hook_vision_keys(self, layer, sink):
        """Hook ViT block `layer` (None: the default vision layer) so that, whenever the tower runs, each visual
        token's key at that block (after its rotary embedding, as the block attends with it), averaged over heads
        and over the 2x2 patches the token merges, is passed to `sink` as one flat (visual tokens, head_dim) fp32
        tensor in token order. Returns the hook handles."""
        attn = self.vision_attention_modules()[self.vision_layer_index(layer)]
        unit = self.inner.visual.spatial_merge_size ** 2
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")

        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            s = x.shape[0]
            q, k, _ = module.qkv(x).float().reshape(s, 3, module.num_heads, -1).unbind(1)  # (S, H, hd)
            cos, sin = kwargs["position_embeddings"]
            _, k = rope(q, k, cos, sin)
            per_unit = k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1)  # (units, hd)
            sink(self._units_in_token_order(per_unit).detach())

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    model_types = ("qwen2_5_vl",)
    box_frame = "pixels"  # Qwen2.5-VL writes absolute pixels of the image as its processor resized it
    windowed_tower = True
    shapes = (
        ModelShape("qwen2.5-vl-7b", "qwen2_5_vl",
                   dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24],
                        tie_word_embeddings=False),
                   dict(_QWEN_VISION, out_hidden_size=3584), "Qwen2.5-VL-7B: windowed ViT (32 blocks), 28-layer decoder"),
        ModelShape("qwen2.5-vl-3b", "qwen2_5_vl",
                   dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24],
                        tie_word_embeddings=True),
                   dict(_QWEN_VISION, out_hidden_size=2048), "Qwen2.5-VL-3B: windowed ViT (32 blocks), 36-layer decoder"),
        ModelShape("qwen2.5-vl-mini", "qwen2_5_vl",
                   dict(vocab_size=32064, hidden_size=512, intermediate_size=2704, num_hidden_layers=28,
                        num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12],
                        tie_word_embeddings=False),
                   dict(_QWEN_VISION, depth=8, hidden_size=256, intermediate_size=684, num_heads=4,
                        fullatt_block_indexes=[3, 7], out_hidden_size=512),
                   "Qwen2.5-VL-7B layout at 1/7 width: 28 layers"),
        ModelShape("qwen2.5-vl-tiny", "qwen2_5_vl",
                   dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=28,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                        tie_word_embeddings=False),
                   dict(_QWEN_VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                        fullatt_block_indexes=[1, 3], out_hidden_size=64),
                   "Qwen2.5-VL layout, tiny widths (tests): 28 layers"),
    )

    @classmethod
    def _tower_dims(cls, vc) -> tuple[int, int, int]:
        return vc.hidden_size, vc.out_hidden_size, 2 * 3 * vc.hidden_size * vc.intermediate_size

    @classmethod
    def model_class(cls, config):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

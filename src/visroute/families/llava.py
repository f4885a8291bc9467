"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, an MLP projector and a Llama-style decoder.
Each `<image>` placeholder expands to the patch grid of one image ([CLS] dropped by the "default" strategy)."""

from __future__ import annotations

import torch

from visroute.families.base import CallInputs, FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_grid(self) -> tuple[int | None, int | None, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        if self.model.config.vision_feature_select_strategy == "default":
            return side, side, 1
        return None, None, 1  # "full" keeps [CLS]: the tokens are no longer a plain grid

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side * side + (self.model.config.vision_feature_select_strategy != "default")

    def rope_position_ids(self, position_ids, batch, length, past, device):
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past)[None, :].expand(batch, -1)
        return position_ids

    def capture(self, a: dict) -> CallInputs:
        visual, images_given = self._visual_mask(a)
        counts, grids = [], []
        if visual is not None:
            per_image = self.tokens_per_image()
            total = int(visual.sum())
            n_images = total // per_image
            if n_images * per_image != total:
                raise ValueError(
                    f"The input holds {total} image tokens, not a multiple of the {per_image} tokens per image "
                    "this model's vision tower produces; the processor does not match the model."
                )
            counts, grids = [per_image] * n_images, [self.image_grid()] * n_images
        return CallInputs(a.get("input_ids"), visual, counts, grids, images_given, a)

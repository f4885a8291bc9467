"""Qwen2-VL and Qwen2.5-VL: a ViT with 2x2 patch merging and a Qwen2 decoder with 3-D M-RoPE. The image-pad
tokens between vision-start and vision-end are the visual tokens; each image has its own (t, h, w) grid."""

from __future__ import annotations

import torch

from visroute.families.base import CallInputs, FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )

    def __init__(self, model):
        super().__init__(model)
        self._tower_hook = None
        self._last_grid_thw: torch.Tensor | None = None

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

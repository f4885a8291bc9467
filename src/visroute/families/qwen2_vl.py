"""Qwen2-VL and Qwen2.5-VL: a ViT with 2x2 patch merging and a Qwen2 decoder with 3-D M-RoPE. The image-pad
tokens between vision-start and vision-end are the visual tokens; each image has its own (t, h, w) grid."""

from __future__ import annotations

import sys

import torch

from visroute.families.base import CallInputs, FamilyAdapter, mean_attention_received


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

    # ---- vision tower -------------------------------------------------------------------------------------
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

"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, an MLP projector and a Llama-style decoder.
Each `<image>` placeholder expands to the patch grid of one image ([CLS] dropped by the "default" strategy)."""

from __future__ import annotations

import torch

from visroute.families.base import CallInputs, FamilyAdapter, cls_attention, mean_attention_received


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

    # ---- vision tower -------------------------------------------------------------------------------------
    def _vision_model(self):
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_attention_modules(self):
        return [layer.self_attn for layer in self._vision_model().encoder.layers]

    def default_vision_layer(self) -> int:
        # hidden_states[f] of the tower is the output of layer f-1 (hidden_states[0] is the embedding), so the
        # feature layer -2 of LLaVA-1.5 is the output of the second-to-last layer; its attention is the one
        # VisionZip and FasterVLM read (`attentions[-2]`). With several feature layers, the last one.
        n = len(self.vision_attention_modules())
        f = self.model.config.vision_feature_layer
        f = f[-1] if isinstance(f, (list, tuple)) else f
        return max(f % (n + 1) - 1, 0)

    def hook_vision_scores(self, layer, sink):
        attn = self.vision_attention_modules()[self.vision_layer_index(layer)]
        has_cls = hasattr(self._vision_model().embeddings, "class_embedding")
        drop_first = self.model.config.vision_feature_select_strategy == "default"  # the projector never sees it

        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            n, t, _ = x.shape
            heads = module.num_heads
            k = module.k_proj(x).float().view(n, t, heads, -1).transpose(1, 2)  # (N, H, T, hd)
            if has_cls:
                q = module.q_proj(x[:, 0]).float().view(n, heads, -1)
                scores = cls_attention(q, k, module.scale)
            else:
                q = module.q_proj(x).float().view(n, t, heads, -1)
                cu = torch.arange(n + 1, device=x.device) * t
                scores = mean_attention_received(q.reshape(n * t, heads, -1), k.transpose(1, 2).reshape(n * t, heads, -1),
                                                 module.scale, cu).view(n, t)
            if drop_first:
                scores = scores[:, 1:]
            sink(scores.reshape(-1).detach())

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

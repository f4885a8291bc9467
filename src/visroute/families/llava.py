"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, an MLP projector and a Llama-style decoder.
Each `<image>` placeholder expands to the patch grid of one image ([CLS] dropped by the "default" strategy)."""

from __future__ import annotations

import torch

from visroute.families.base import (
    CallInputs,
    FamilyAdapter,
    ImageFrame,
    ModelShape,
    bidirectional_attention_flops,
    cls_attention,
    hook_mean_of_outputs,
    mean_attention_received,
    processor_view_box,
)

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14)
_LLAMA_IMAGE_ID = 32000  # llava-hf's <image>, right after Llama's 32,000 words


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)
    box_frame = "normalized"  # LLaVA-1.5 writes boxes in [0, 1] over the (square) image it was shown
    shapes = (
        ModelShape("llava-1.5-7b", "llava",
                   dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
                   _CLIP_L_336, "LLaVA-1.5-7B: CLIP ViT-L/14-336, 2-layer MLP projector, Vicuna-7B decoder",
                   aliases=("llava-1.5",)),
        ModelShape("llava-1.5-1b", "llava",
                   dict(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
                   _CLIP_L_336, "LLaVA-1.5 layout with a 1.1B decoder (TinyLlama widths, 16 full K/V heads): CLIP "
                   "ViT-L/14-336, 22 layers, 576 visual tokens"),
        # Scaled down: the real layer and visual-token counts (so presets apply unchanged), small widths.
        ModelShape("llava-1.5-mini", "llava",
                   dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=32,
                        num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=4096),
                   dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        image_size=336, patch_size=14),
                   "LLaVA-1.5 layout at 1/8 width: 32 layers, 576 visual tokens"),
        ModelShape("llava-1.5-tiny", "llava",
                   dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=32,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048),
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=96, patch_size=4),
                   "LLaVA-1.5 layout, tiny widths (tests): 32 layers, 576 visual tokens"),
    )

    # ---- facts read off a config -------------------------------------------------------------------------------
    @classmethod
    def _side(cls, config) -> int:
        vc = config.vision_config
        return vc.image_size // vc.patch_size

    @classmethod
    def visual_tokens(cls, config, height=None, width=None) -> int:
        # Every image is resized to the tower's square input: the count does not depend on the image.
        return cls._side(config) ** 2 + (config.vision_feature_select_strategy != "default")

    @classmethod
    def image_grid(cls, config) -> tuple[int | None, int | None, int]:
        side = cls._side(config)
        if config.vision_feature_select_strategy == "default":
            return side, side, 1
        return None, None, 1  # "full" keeps [CLS]: the tokens are no longer a plain grid

    @classmethod
    def vision_flops(cls, config, images) -> tuple[int, int]:
        vc = config.vision_config
        n = cls._side(config) ** 2 + 1  # patches + [CLS]
        d, m = vc.hidden_size, vc.intermediate_size
        embed = 2 * (3 * vc.patch_size ** 2) * d * (n - 1)
        # transformers runs every tower layer, although `vision_feature_layer=-2` uses the second to last one.
        per_layer = 2 * n * (4 * d * d + 2 * d * m) + bidirectional_attention_flops(n, d)
        tower = embed + vc.num_hidden_layers * per_layer
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        feats = n - 1 if config.vision_feature_select_strategy == "default" else n
        t = config.text_config.hidden_size
        projector = 2 * feats * (d * layers * t + t * t)
        return tower * len(images), projector * len(images)

    @classmethod
    def plain_prompt(cls, question, num_images, image_token=None) -> str:
        # LLaVA-1.5's conversation format (llava-hf's chat template renders the same text)
        return "USER: " + f"{image_token or '<image>'}\n" * num_images + question + " ASSISTANT:"

    @classmethod
    def build_config(cls, shape):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        text = LlamaConfig(**shape.text, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = CLIPVisionConfig(**shape.vision)
        side = vision.image_size // vision.patch_size
        # A tiny vocabulary still needs room for the image token id: keep the real id only when it fits.
        image_id = _LLAMA_IMAGE_ID if text.vocab_size > _LLAMA_IMAGE_ID else text.vocab_size - 2
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_seq_length=side * side, projector_hidden_act="gelu", tie_word_embeddings=False)

    @classmethod
    def model_class(cls, config):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def synthetic_inputs(cls, config, text_tokens, height, width, generator):
        # LLaVA resizes every image to the tower's square input, whatever height x width the caller asks for.
        vc = config.vision_config
        text = torch.randint(3, max(4, min(config.text_config.vocab_size, config.image_token_id) - 8), (text_tokens,),
                             generator=generator).tolist()
        head, tail = text[: min(8, text_tokens // 4)], text[min(8, text_tokens // 4):]
        ids = [1] + head + [config.image_token_id] * config.image_seq_length + tail
        pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=generator)
        return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}

    # ---- a model -----------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def tokens_per_image(self) -> int:
        return self.visual_tokens(self.model.config)

    def rope_position_ids(self, position_ids, batch, length, past, device):
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past)[None, :].expand(batch, -1)
        return position_ids

    def image_frames(self, processor, images, inputs, box_frame=None):
        rows, cols, _ = self.image_grid(self.model.config)
        if rows is None:
            raise ValueError("This LLaVA model keeps [CLS] among its visual tokens: they form no grid")
        side = self.model.config.vision_config.image_size
        return [ImageFrame(width=im.size[0], height=im.size[1], view=processor_view_box(im.size, processor),
                           rows=rows, cols=cols, canvas=(side, side), box_frame=box_frame or self.box_frame)
                for im in images]

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
            counts, grids = [per_image] * n_images, [self.image_grid(self.model.config)] * n_images
        return CallInputs(a.get("input_ids"), visual, counts, grids, images_given, a)

    # ---- vision tower ------------------------------------------------------------------------------------------
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

    # ---- vision-tower features (merges) ------------------------------------------------------------------------
    def hook_vision_features(self, first: int, last: int, sink):
        """Hook tower layers `first`..`last` (0-based, inclusive) so that, whenever the tower runs, the mean of
        their outputs (the tower's `hidden_states[first + 1 : last + 2]`) at each visual token of every image
        of that call is passed to `sink` as one flat (tokens, tower width) fp32 tensor, in the order the images'
        tokens fill the batch's visual tokens (Nüwa's similarity features). Returns the hook handles."""
        drop_first = self.model.config.vision_feature_select_strategy == "default"

        def finish(mean: torch.Tensor) -> None:
            mean = mean[:, 1:] if drop_first else mean
            sink(mean.reshape(-1, mean.shape[-1]).detach())

        return hook_mean_of_outputs(self._vision_model().encoder.layers, first, last, finish)

    def hook_projector_input(self, sink):
        """Hook the projector so that, whenever it runs, its input at each visual token (the tower features of the
        feature layer, [CLS] dropped by the "default" strategy) is passed to `sink` as one flat (tokens, width)
        tensor in the batch's visual-token order: merges that work in the tower's space before the projector
        (Nüwa) read it here and send their result through `project_visual`. Returns the hook handles."""

        def hook(module, args, kwargs):
            x = kwargs["image_features"] if "image_features" in kwargs else args[0]
            sink(x.reshape(-1, x.shape[-1]).detach())

        return [self.inner.multi_modal_projector.register_forward_pre_hook(hook, with_kwargs=True)]

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """The projector applied to tower features (..., tower width) -> decoder input embeddings (..., D)."""
        projector = self.inner.multi_modal_projector
        weight = next(projector.parameters())
        return projector(features.to(device=weight.device, dtype=weight.dtype))

    def hook_vision_keys(self, layer, sink):
        """Hook tower layer `layer` (None: the default vision layer) so that, whenever the tower runs, each visual
        token's key at that layer, averaged over heads (VisionZip's `metric`, before any position encoding: CLIP
        has none inside its layers), is passed to `sink` as one flat (tokens, head_dim) fp32 tensor in the
        batch's visual-token order. Returns the hook handles."""
        attn = self.vision_attention_modules()[self.vision_layer_index(layer)]
        drop_first = self.model.config.vision_feature_select_strategy == "default"

        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            n, t, _ = x.shape
            keys = module.k_proj(x).float().view(n, t, module.num_heads, -1).mean(2)  # (N, T, hd)
            if drop_first:
                keys = keys[:, 1:]
            sink(keys.reshape(-1, keys.shape[-1]).detach())

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

"""Qwen3-VL and Qwen3-VL-MoE: a ViT with 2x2 patch merging (no window attention) and a Qwen3 decoder (q/k norms,
interleaved 3-D M-RoPE) that also receives DeepStack features: the tower taps some of its blocks
(`deepstack_visual_indexes`), merges each tap like its output, and the text model adds tap i to the hidden state
of every visual position after decoder layer i.

DeepStack under routing. A DeepStack feature follows its token's hidden state:

* it is added to the rows of the active visual tokens after decoder layers 0, 1, 2, exactly as the unmodified
  model adds it (same place, same dtype);
* under `reroute`, an inactive visual token's carried state receives it too, as the unmodified model adds it to
  every visual position (the masking oracle: the token's layer output is replaced by its input, then the
  feature is added outside the layer); a token that re-enters resumes from that state;
* under `prune`, a dropped token's features are gone with it; a stage before the decoder (layer 0) that drops
  tokens drops their features, so only the kept tokens' features are ever added (the features subset with
  the tokens);
* a merge step at layer 0 merges input embeddings only: each kept token still receives its own features.

Keep-all schedules equal the unmodified model. Video inputs are refused while routing. Positions are the model's
own (4-row position ids, text row dropped, as `Qwen3VLTextModel` normalises them); its rotary embedding makes the
interleaved M-RoPE cos/sin.
"""

from __future__ import annotations

import dataclasses

import torch

from visroute.families.base import CallInputs, ModelShape
from visroute.families.qwen2_vl import Qwen2VLAdapter, resized_size
from visroute.tensors import gather_rows, scatter_rows_

# The image processor settings the released Qwen3-VL checkpoints ship (preprocessor_config.json: size
# shortest_edge / longest_edge, in pixels), patch 16 and merge 2.
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 65536, 16777216
_QWEN3_VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                        deepstack_visual_indexes=[8, 16, 24])


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    model_types = ("qwen3_vl",)
    box_frame = "scale_1000"  # Qwen3-VL writes boxes in relative coordinates [0, 1000) over the image
    decoder_inputs = frozenset({"deepstack_visual_embeds", "visual_pos_masks"})
    shapes = (
        ModelShape("qwen3-vl-8b", "qwen3_vl",
                   dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20],
                        rope_theta=5_000_000.0, tie_word_embeddings=False),
                   _QWEN3_VISION_8B,
                   "Qwen3-VL-8B: ViT (27 blocks, DeepStack taps 8/16/24), 36-layer Qwen3 decoder"),
        ModelShape("qwen3-vl-tiny", "qwen3_vl",
                   dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=36,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2],
                        rope_theta=5_000_000.0, tie_word_embeddings=False),
                   dict(_QWEN3_VISION_8B, depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                        out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2]),
                   "Qwen3-VL layout, tiny widths (tests): 36 layers, 3 DeepStack taps"),
    )

    # ---- facts read off a config -------------------------------------------------------------------------------
    @classmethod
    def visual_tokens(cls, config, height=None, width=None, min_pixels: int = QWEN3_MIN_PIXELS,
                      max_pixels: int = QWEN3_MAX_PIXELS) -> int | None:
        return super().visual_tokens(config, height, width, min_pixels, max_pixels)

    @classmethod
    def _tower_dims(cls, vc) -> tuple[int, int, int]:
        # fc1 -> GELU -> fc2: two matrices, not gated
        return vc.hidden_size, vc.out_hidden_size, 2 * 2 * vc.hidden_size * vc.intermediate_size

    @classmethod
    def vision_flops(cls, config, images) -> tuple[int, int]:
        # Every block attends over its whole image (no windows); besides the merger that feeds the input
        # embeddings, one merger of the same size per DeepStack tap.
        tower, projector = super().vision_flops(config, images)
        return tower, projector * (1 + len(config.vision_config.deepstack_visual_indexes))

    @classmethod
    def plain_prompt(cls, question, num_images, image_token=None) -> str:
        # the chat format of the released checkpoints' template (no default system prompt, unlike Qwen2-VL's)
        image = "<|vision_start|>" + (image_token or "<|image_pad|>") + "<|vision_end|>"
        return "<|im_start|>user\n" + image * num_images + question + "<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def model_class(cls, config):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    @classmethod
    def build_config(cls, shape):
        # Qwen2-VL's build with Qwen3-VL's rotary base, interleaved M-RoPE and context length
        text = dict(shape.text)
        theta = text.pop("rope_theta")
        config = super().build_config(dataclasses.replace(shape, text=text))
        tc = config.text_config
        tc.rope_parameters = dict(tc.rope_parameters, rope_theta=theta, mrope_interleaved=True)
        tc.max_position_embeddings = 262144
        return config

    @classmethod
    def synthetic_inputs(cls, config, text_tokens, height, width, generator):
        vc = config.vision_config
        # resized as Qwen3-VL's processor resizes (its own pixel bounds), then laid out as for Qwen2-VL
        h, w = resized_size(height, width, vc.patch_size, vc.spatial_merge_size, QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS)
        return super().synthetic_inputs(config, text_tokens, h, w, generator)

    # ---- a model -----------------------------------------------------------------------------------------------
    def capture(self, a: dict) -> CallInputs:
        encoded = a.get("mm_encoder_outputs") or {}
        ids = a.get("input_ids")
        video_ids = ids is not None and bool((ids == self.model.config.video_token_id).any())
        if a.get("pixel_values_videos") is not None or encoded.get("video") is not None or video_ids:
            raise ValueError(
                "visroute routes Qwen3-VL's image tokens only: video inputs (pixel_values_videos, video tokens) "
                "are not supported while routing. Remove the router (router.remove()) to run videos."
            )
        return super().capture(a)

    def after_layer(self, layer_index, hidden, index, valid, state):
        """Adds DeepStack feature `layer_index` (if there is one) to the visual rows of the compact sequence, and
        under reroute to the carried state of the inactive visual tokens (see the module docstring)."""
        deep = state.decoder_kwargs.get("deepstack_visual_embeds")
        mask = state.decoder_kwargs.get("visual_pos_masks")
        if deep is None or mask is None or layer_index >= len(deep):
            return hidden
        b, length = mask.shape
        # the feature of every sequence position (zero off the visual ones and at the dummy slot L)
        feats = hidden.new_zeros(b, length + 1, hidden.shape[-1])
        feats[:, :length][mask.to(hidden.device)] = deep[layer_index].to(hidden.device, hidden.dtype)
        hidden = hidden + gather_rows(feats, index)
        if any(st.action == "reroute" for st in state.record.stages):  # a bypassed token may come back
            layout, full = state.layout, state.full
            dummy = torch.full_like(layout.positions, length)
            carried = torch.where(layout.valid & ~state.active, layout.positions, dummy)
            rows = gather_rows(full, carried) + gather_rows(feats, carried).to(full.device)
            scatter_rows_(full, carried, rows)  # entries of active tokens and padding land in the dummy slot
        return hidden


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same tower, DeepStack and positions; each decoder layer's MLP is a sparse mixture of
    experts routed per token, which a compact sequence does not change. (Decoder FLOPs are counted as for a
    dense MLP of `intermediate_size`; no MoE bench shape is defined.)"""

    name = "qwen3_vl_moe"
    model_classes = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
    model_types = ("qwen3_vl_moe",)
    # the model always passes `output_router_logits` to its text decoder; routing takes it and refuses it when set
    decoder_inputs = Qwen3VLAdapter.decoder_inputs | {"output_router_logits"}
    shapes = ()

    def capture(self, a: dict) -> CallInputs:
        asked = a.get("output_router_logits")
        if asked is None:
            asked = getattr(self.model.config.text_config, "output_router_logits", False)
        if asked:
            raise ValueError(
                "output_router_logits is not available while routing (the routed decoder records no router "
                "logits); pass output_router_logits=False, or router.remove() for an unrouted forward"
            )
        return super().capture(a)

    def install(self) -> None:
        super().install()

        # The model reads `router_logits` off its decoder's output (None unless asked for); the routed decoder
        # returns a plain output, which this hook gives the field.
        def with_router_logits(module, args, output):
            if hasattr(output, "router_logits"):
                return output
            from transformers.modeling_outputs import MoeModelOutputWithPast

            return MoeModelOutputWithPast(last_hidden_state=output.last_hidden_state,
                                          past_key_values=output.past_key_values, router_logits=None)

        self._output_hook = self.language_model.register_forward_hook(with_router_logits)

    def uninstall(self) -> None:
        super().uninstall()
        hook = getattr(self, "_output_hook", None)
        if hook is not None:
            hook.remove()
            self._output_hook = None

    @classmethod
    def model_class(cls, config):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig

"""The testbed model's tokenizer, processor and configuration, built here without any download.

The tokenizer is a word-level Hugging Face tokenizer over the testbed's closed vocabulary (lower-cased,
split on whitespace and punctuation) with <pad>, <s>, </s>, <unk> and the <image> placeholder. The processor is
a regular `LlavaProcessor`: it expands <image> into the 12 x 12 = 144 patch tokens of the CLIP-style tower.
The prompt format is LLaVA-1.5's plain one, the same `visroute generate` falls back to:

    USER: <image>\n{question} ASSISTANT: {answer}</s>

and, for the blind control (the image removed), `USER: {question} ASSISTANT:`.
"""

from __future__ import annotations

import torch

from visroute.testbed.scenes import ALL_COLORS, GRID, IMAGE_SIZE, PATCH, PLURALS, PRIOR_SHAPES, SHAPES

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
WORDS = (
    ["user", "assistant", ":", "?", "what", "color", "shape", "is", "the", "object", "objects", "there", "a",
     "how", "many", "are", "left", "of", "above", "where", "yes", "no"]
    + sorted(ALL_COLORS) + list(SHAPES) + sorted(PRIOR_SHAPES) + [PLURALS[s] for s in SHAPES]
    + [str(i) for i in range(GRID + 1)]
    + ["right", "below", "other", "with"]
)
VOCAB = SPECIAL_TOKENS + WORDS

IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def prompt(question: str, image: bool = True) -> str:
    """The prompt the testbed model is trained on; without `image`, the blind-control prompt."""
    return f"USER: <image>\n{question} ASSISTANT:" if image else f"USER: {question} ASSISTANT:"


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `VOCAB` that adds <s> in front and pads on the left."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    for name, i in (("pad", PAD_ID), ("bos", BOS_ID), ("eos", EOS_ID), ("unk", UNK_ID)):
        assert getattr(fast, f"{name}_token_id") == i, name
    return fast


def build_processor():
    """The `LlavaProcessor` of the testbed model (CLIP-style image processor at 192 px, patch 16)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )


MODEL_SIZES = {
    # decoder hidden / layers / heads / kv heads / mlp, tower hidden / layers / mlp; RoPE base (rope_theta, default
    # 10000: with 20 dimensions per head only a few of them then turn slowly enough over 150 positions to match
    # tokens by content; at 1e6 about half of them do)
    "deep": dict(hidden=160, layers=12, heads=5, kv_heads=5, mlp=480, v_hidden=128, v_layers=2, v_mlp=384,
                 rope_theta=1e6),
    "small": dict(hidden=160, layers=8, heads=8, kv_heads=4, mlp=480, v_hidden=128, v_layers=2, v_mlp=384),
    "tiny": dict(hidden=64, layers=8, heads=4, kv_heads=2, mlp=128, v_hidden=32, v_layers=1, v_mlp=64),
}


def build_config(size: str = "deep"):
    """`LlavaConfig` of the testbed model: a CLIP vision tower over 12 x 12 patches, a 2-layer MLP projector and
    a Llama decoder (12 layers in the default size), SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = MODEL_SIZES[size]
    text = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": s.get("rope_theta", 10000.0)},
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_hidden_layers=s["v_layers"],
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_seq_length=GRID * GRID,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg


def build_model(size: str = "deep", seed: int = 0):
    """A freshly initialised testbed model (seeded)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(size))
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=8, do_sample=False,
    )
    return model


def pixel_values(images) -> torch.Tensor:
    """(N, 3, 192, 192) model inputs for 192 x 192 RGB images: exactly what the processor computes for them
    (no resize or crop is needed at this size), without its per-image overhead."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

"""Tiny random-weight VLMs built from configs with the real transformers classes, batches for them, and the
family table (`FAMILIES`): one row per model family, which the fixtures in conftest.py and every suite run over."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 120
IMAGE_TOKEN = 100  # LLaVA <image>
PAD = 0


def tiny_llava(layers: int = 6, attn: str = "sdpa", seed: int = 0, image_size: int = 32, patch: int = 8):
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-1, image_seq_length=(image_size // patch) ** 2)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    _spread_weights(model)
    return model


def tiny_llava_qwen3(layers: int = 6, attn: str = "sdpa", seed: int = 0):
    """A tiny LLaVA whose decoder is a Qwen3 (per-head q_norm / k_norm before RoPE, as in Qwen3, Gemma 3 and
    InternVL3.5 decoders); the norm weights are random so that leaving them out shows."""
    from transformers import Qwen3Config

    torch.manual_seed(seed)
    text = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=PAD,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                      image_seq_length=16)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    _spread_weights(model)
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
    return model


def _spread_weights(model, std: float = 0.2):
    # Random init of tiny models gives near-uniform attention; larger weights make routing decisions matter.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "language_model" in name and ("proj" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def llava_batch(model, prompts: list[list[int]], n_images: list[int], seed: int = 0):
    """Left-padded batch. Each prompt is a list of text ids; sample i gets n_images[i] image blocks after its
    first token."""
    g = torch.Generator().manual_seed(seed)
    per = model.config.image_seq_length
    seqs = []
    for ids, n in zip(prompts, n_images):
        seqs.append(ids[:1] + [IMAGE_TOKEN] * (per * n) + ids[1:])
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    vc = model.config.vision_config
    pixel_values = torch.randn(sum(n_images), 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}


QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 110, 111, 112


def tiny_qwen(version: str = "2.5", layers: int = 6, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    if version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                               vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND,
                               video_token_id=113, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                            vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND,
                            video_token_id=113, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
        cls = Qwen2VLForConditionalGeneration
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


def qwen_batch(model, prompts: list[list[int]], grids: list[list[tuple[int, int]]], seed: int = 0):
    """Left-padded batch; sample i holds images with patch grids grids[i] = [(h, w), ...] (before merging),
    each wrapped in vision-start / vision-end after the prompt's first token."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    m = vc.spatial_merge_size
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    seqs, types, pixels, thw = [], [], [], []
    for ids, sample_grids in zip(prompts, grids):
        s, t = ids[:1], [0]
        for h, w in sample_grids:
            n = (h // m) * (w // m)
            s += [QWEN_VSTART] + [QWEN_IMAGE] * n + [QWEN_VEND]
            t += [0] + [1] * n + [0]
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
            thw.append([1, h, w])
        s += ids[1:]
        t += [0] * (len(ids) - 1)
        seqs.append(s)
        types.append(t)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    mm = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, types)):
        input_ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
        mm[i, length - len(s):] = torch.tensor(t)
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(thw)
    return out


def tiny_llava_processor(model):
    """A real LlavaProcessor for `tiny_llava`: a word-level tokenizer over the tiny vocabulary and the PIL CLIP
    image processor, so the pair saves and loads like any Hugging Face checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3}
    words = ["USER:", "ASSISTANT:", "what", "is", "the", "colour", "of", "shape", "red", "blue", "?"]
    for i, w in enumerate(words):
        vocab[w] = 4 + i
    for i in range(4 + len(words), VOCAB):
        if i != IMAGE_TOKEN:
            vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side="left")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vc = model.config.vision_config
    images = CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                                   crop_size={"height": vc.image_size, "width": vc.image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vc.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


# ---- Qwen3-VL (DeepStack) and LLaVA-NeXT / OneVision (tiles) --------------------------------------------------
def tiny_qwen3_vl(moe: bool = False, layers: int = 6, attn: str = "sdpa", seed: int = 0, deepstack: int = 2):
    """A tiny Qwen3-VL (`moe`: Qwen3-VL-MoE, 4 experts, 2 per token, whose widths add up to `intermediate_size`
    as in the released MoE checkpoints): a decoder with per-head q/k norms and interleaved M-RoPE, and a ViT of
    `deepstack` (at least 2) blocks each of which feeds a DeepStack feature, added to the visual positions after
    decoder layers 0 .. deepstack - 1 (the released checkpoints: 3)."""
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if moe:
        text.update(intermediate_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    decoder_sparse_step=1)
    vision = dict(depth=max(2, deepstack), hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=list(range(deepstack)))
    config_class, cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                         else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    cfg = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                       vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND, video_token_id=113)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    if moe and attn == "eager":  # the experts as plain matmuls too (FlopCounterMode counts no grouped_mm)
        cfg.text_config._experts_implementation = "eager"
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # 32 px tiles of 4 x 4 patches


def tiny_llava_next(version: str = "next", layers: int = 6, attn: str = "sdpa", seed: int = 0,
                    decoder: str = "llama", sliding_window: int | None = None):
    """A tiny LLaVA-NeXT (CLIP tower with [CLS], Llama or Mistral decoder) or, `version="onevision"`, a tiny
    LLaVA-OneVision (SigLIP tower without [CLS], Qwen2 decoder, `anyres_max_2`: high-resolution maps beyond
    about two tiles' worth are bilinearly downsampled). Tiles of 32 x 32 pixels, 4 x 4 patches."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, MistralConfig,
                              Qwen2Config, SiglipVisionConfig)

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if version == "next":
        decoder_config = MistralConfig(**text, sliding_window=sliding_window) if decoder == "mistral" else LlamaConfig(**text)
        cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=decoder_config,
                              image_token_id=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-1)
        cls = LlavaNextForConditionalGeneration
    else:
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
                                   text_config=Qwen2Config(**text), image_token_id=IMAGE_TOKEN, video_token_id=101,
                                   image_grid_pinpoints=NEXT_PINPOINTS + [[64, 96], [96, 64], [96, 96]],
                                   vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1)
        cls = LlavaOnevisionForConditionalGeneration
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


def llava_next_batch(model, prompts: list[list[int]], images: list[list[tuple[int, int]]], seed: int = 0):
    """Left-padded batch; sample i holds images of (height, width) pixels images[i], their placeholders after the
    prompt's first token. As the processors do: each image's tiles (transformers' own count; on OneVision an image
    is tiled only when it is its sample's only one), zero-padded to the batch's most tiles, and as many
    placeholders as the model's own `get_image_features` gives features."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tile = cfg.vision_config.image_size
    onevision = cfg.model_type == "llava_onevision"
    sizes = [list(hw) for sample in images for hw in sample]
    per_sample = [len(sample) for sample in images]
    tiles = [image_size_to_num_patches(hw, cfg.image_grid_pinpoints, tile) if not onevision or n == 1 else 1
             for n, sample in zip(per_sample, images) for hw in sample]
    out: dict = {}
    counts: list[int] = []
    if sizes:
        most = max(tiles)
        pixels = torch.zeros(len(sizes), most, 3, tile, tile)
        for i, t in enumerate(tiles):
            pixels[i, :t] = torch.randn(t, 3, tile, tile, generator=g)
        out = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
        if onevision:
            out["batch_num_images"] = torch.tensor(per_sample)
        with torch.no_grad():
            feats = model.model.get_image_features(**out).pooler_output
        counts = [int(f.shape[0]) for f in feats]
    it = iter(counts)
    seqs = [ids[:1] + [IMAGE_TOKEN] * sum(next(it) for _ in sample) + ids[1:] for ids, sample in zip(prompts, images)]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **out}


# ---- the family table ---------------------------------------------------------------------------------------
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # (B, L) per-token inputs


@dataclass(frozen=True)
class TinyFamily:
    """One row of the family table: how to build a tiny model of the family and a padded batch for it.

    build:          build(attn="sdpa", layers=6, seed=0) -> a tiny random-weight model
    image_token_id: the id of its visual-token placeholder
    images:         per prompt of the standard batch, its images (several per sample; `image_size` gives each
                    image's (h, w) in patches before merging, None where the family resizes every image alike)
    make_batch:     make_batch(model, prompts, images, seed) -> a left-padded batch
    pixel_rows:     rows of `pixel_values` one image takes
    draw_image:     a random image of the family (for randomized batches)
    tower:          the kind of vision tower, for the references of vision-tower scores: "clip" (a [CLS] token)
                    or "qwen_vit" (no [CLS]; 2x2 merged patches) or "tiles" (LLaVA-NeXT / OneVision: per tile,
                    laid out as the features are)
    own_positions:  the model numbers each sample's tokens itself from the attention mask (Qwen's M-RoPE);
                    otherwise a left-padded forward numbers the padding too, and `padded_positions` gives the
                    positions `generate` would use
    quick:          also run by the tests that sample the families (`fam` fixture); `any_fam` runs every row
    """

    name: str
    build: Callable[..., Any]
    image_token_id: int
    images: tuple[tuple[Any, ...], ...]
    make_batch: Callable[..., dict]
    pixel_rows: Callable[[Any], int]
    draw_image: Callable[[random.Random], Any]
    tower: str = "clip"
    own_positions: bool = False
    quick: bool = True

    def padded_positions(self, inputs: dict) -> dict:
        """Keyword inputs that number each sample of a left-padded batch from 0, as `generate` does."""
        if self.own_positions:
            return {}
        return {"position_ids": (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)}

    def batch(self, model, prompts: list[list[int]], images=None, seed: int = 0) -> dict:
        images = self.images[: len(prompts)] if images is None else images
        return self.make_batch(model, prompts, [list(x) for x in images], seed)

    def select(self, inputs: dict, images, rows: list[int], strip_padding: bool = False) -> dict:
        """The samples `rows` of a batch whose samples hold `images` (repeats allowed: beam search expands a
        batch so), with their images; `strip_padding` (one row only) drops its padding."""
        out = {k: inputs[k][rows] for k in SEQUENCE_KEYS if k in inputs}
        starts, n = [], 0  # first image, first pixel row of each sample
        for sample in images:
            starts.append((sum(len(s) for s in images[: len(starts)]), n))
            n += sum(self.pixel_rows(im) for im in sample)
        if "pixel_values" in inputs:
            pix, grid = [], []
            for r in rows:
                first_image, first_row = starts[r]
                count = sum(self.pixel_rows(im) for im in images[r])
                pix.append(inputs["pixel_values"][first_row : first_row + count])
                if "image_grid_thw" in inputs:
                    grid.append(inputs["image_grid_thw"][first_image : first_image + len(images[r])])
            out["pixel_values"] = torch.cat(pix)
            if grid:
                out["image_grid_thw"] = torch.cat(grid)
        if strip_padding:
            if len(rows) != 1:
                raise ValueError("strip_padding takes one row")
            keep = out["attention_mask"][0].bool()
            out.update({k: out[k][:, keep] for k in SEQUENCE_KEYS if k in out})
        return out


def _llava_batch(model, prompts, images, seed):
    return llava_batch(model, prompts, [len(s) for s in images], seed=seed)


def _draw_qwen_image(rng: random.Random) -> tuple[int, int]:
    return rng.choice((4, 6, 8)), rng.choice((4, 6, 8, 12))


@dataclass(frozen=True)
class TinyTiledFamily(TinyFamily):
    """A row whose images also come with per-image `image_sizes` and, on OneVision, per-sample
    `batch_num_images` (LLaVA-NeXT, OneVision): `select` takes them along."""

    def select(self, inputs: dict, images, rows: list[int], strip_padding: bool = False) -> dict:
        out = super().select(inputs, images, rows, strip_padding)
        if not any(images[r] for r in rows):
            for k in ("pixel_values", "image_sizes", "batch_num_images"):
                out.pop(k, None)
            return out
        if "image_sizes" in inputs:
            first = [sum(len(s) for s in images[:r]) for r in rows]
            out["image_sizes"] = torch.cat([inputs["image_sizes"][f : f + len(images[r])] for f, r in zip(first, rows)])
        if "batch_num_images" in inputs:
            out["batch_num_images"] = inputs["batch_num_images"][rows]
        return out


def _draw_tiled_image(rng: random.Random) -> tuple[int, int]:
    return rng.choice((16, 20, 32, 40, 64, 90)), rng.choice((16, 24, 32, 48, 64, 90))


FAMILIES: dict[str, TinyFamily] = {
    row.name: row
    for row in (
        TinyFamily("llava", tiny_llava, IMAGE_TOKEN, images=((None,), (None, None), (None,)),
                   make_batch=_llava_batch, pixel_rows=lambda image: 1, draw_image=lambda rng: None),
        TinyFamily("qwen2.5", partial(tiny_qwen, "2.5"), QWEN_IMAGE, images=(((8, 8),), ((4, 8), (8, 4)), ((8, 12),)),
                   make_batch=qwen_batch, pixel_rows=lambda hw: hw[0] * hw[1], draw_image=_draw_qwen_image,
                   tower="qwen_vit", own_positions=True),
        TinyFamily("qwen2", partial(tiny_qwen, "2"), QWEN_IMAGE, images=(((8, 8),), ((4, 8), (8, 4)), ((8, 12),)),
                   make_batch=qwen_batch, pixel_rows=lambda hw: hw[0] * hw[1], draw_image=_draw_qwen_image,
                   tower="qwen_vit", own_positions=True, quick=False),
        # not a family of its own: LLaVA's adapter on a decoder with per-head q/k norms (Qwen3)
        TinyFamily("llava-qwen3", tiny_llava_qwen3, IMAGE_TOKEN, images=((None,), (None, None), (None,)),
                   make_batch=_llava_batch, pixel_rows=lambda image: 1, draw_image=lambda rng: None, quick=False),
        # DeepStack: features added to the visual positions after decoder layers 0 and 1
        TinyFamily("qwen3-vl", tiny_qwen3_vl, QWEN_IMAGE, images=(((8, 8),), ((4, 8), (8, 4)), ((8, 12),)),
                   make_batch=qwen_batch, pixel_rows=lambda hw: hw[0] * hw[1], draw_image=_draw_qwen_image,
                   tower="qwen_vit", own_positions=True, quick=False),
        TinyFamily("qwen3-vl-moe", partial(tiny_qwen3_vl, True), QWEN_IMAGE,
                   images=(((8, 8),), ((4, 8), (8, 4)), ((8, 12),)), make_batch=qwen_batch,
                   pixel_rows=lambda hw: hw[0] * hw[1], draw_image=_draw_qwen_image, tower="qwen_vit",
                   own_positions=True, quick=False),
        # tiles: images of (height, width) pixels; unpadded rows, two images in a sample, 3 x 3 tiles (OneVision:
        # the two images untiled, the 3 x 3 map downsampled)
        TinyTiledFamily("llava-next", tiny_llava_next, IMAGE_TOKEN, images=(((20, 64),), ((64, 64), (64, 16)), ((70, 90),)),
                        make_batch=llava_next_batch, pixel_rows=lambda hw: 1, draw_image=_draw_tiled_image,
                        tower="tiles", quick=False),
        TinyTiledFamily("llava-onevision", partial(tiny_llava_next, "onevision"), IMAGE_TOKEN,
                        images=(((20, 64),), ((64, 64), (64, 16)), ((70, 90),)), make_batch=llava_next_batch,
                        pixel_rows=lambda hw: 1, draw_image=_draw_tiled_image, tower="tiles", quick=False),
    )
}

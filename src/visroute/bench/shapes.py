"""Real-shaped models with random weights, and synthetic inputs for them. Each shape and its builders belong to
a model family (`visroute.families`); this module only looks them up and fills the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from visroute.bench.settings import parse_image_size  # noqa: F401  (re-exported)
from visroute.families import ModelShape, families, get_shape, shapes


def family_of(name: str):
    """The family adapter class that builds the shape `name`."""
    return families()[get_shape(name).family]


def model_config(name: str):
    """The transformers config of a named shape (SDPA attention)."""
    return family_of(name).build_config(get_shape(name))


def build_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                seed: int = 0, std: float = 0.02) -> nn.Module:
    """A random-weight model of a named shape, built directly in `dtype` on `device` (no float32 copy, no slow
    init): weights uniform with standard deviation `std`, norms 1, biases 0."""
    from transformers.initialization import no_init_weights

    cfg = model_config(name)
    cls = family_of(name).model_class(cfg)
    with no_init_weights(), torch.device(device):
        model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = std * math.sqrt(3.0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 or "class_embedding" in pname:
                p.uniform_(-bound, bound, generator=gen)
            elif pname.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model: nn.Module, name: str, text_tokens: int = 64, image_size: tuple[int, int] = (672, 672),
                seed: int = 0) -> dict[str, torch.Tensor]:
    """One synthetic prompt: `text_tokens` random text ids around one image's placeholders, and random pixels,
    laid out as the family's processor would for an image of `image_size` (height, width)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    out = family_of(name).synthetic_inputs(model.config, text_tokens, image_size[0], image_size[1], g)
    out["pixel_values"] = out["pixel_values"].to(dtype)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return {k: v.to(device) for k, v in out.items()}


def repeat_inputs(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """`n` copies of a one-prompt input as one batch: every tensor repeated along its first dimension (the
    sequence rows, and the image's pixels and grid rows, which the families lay out image after image)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}


def visual_count(name: str, image_size: tuple[int, int]) -> int:
    """Visual tokens one image of `image_size` (height, width) gives on the shape `name`."""
    count = family_of(name).visual_tokens(model_config(name), *image_size)
    if count is None:
        raise ValueError(f"The family of {name} cannot say how many visual tokens an image gives")
    return count


SHAPES: dict[str, ModelShape] = shapes()

"""Method presets ("pdrop@128", `visroute.methods`) solved for a loaded model: its decoder depth and its visual
tokens per image.

A family whose images always give the same number of visual tokens (LLaVA-1.5: 576) gets integer keeps that hit
the tier exactly. A family whose count depends on the image (Qwen2-VL / 2.5-VL) gets its keeps solved at
`REFERENCE_VISUAL` tokens (the 576 of the papers' max_pixels = 451,584) and written as fractions, so an image with
n visual tokens keeps about n/576 of the tier's tokens (floored per sample)."""

from __future__ import annotations

from visroute.config import RoutingConfig, Stage

REFERENCE_VISUAL = 576


def preset_for_model(spec: str, model) -> RoutingConfig:
    """The method `spec` ("NAME@TIER[:key=value...]", `visroute.methods.parse_method_spec`) for `model`."""
    from visroute.families import adapter_for
    from visroute.methods import method_config, parse_method_spec

    parse_method_spec(spec)  # a bad spec fails before the model is read
    adapter = adapter_for(model)
    fixed = type(adapter).visual_tokens(model.config)
    if fixed is not None:
        return method_config(spec, adapter.num_layers, fixed, adapter.name)
    cfg = method_config(spec, adapter.num_layers, REFERENCE_VISUAL, adapter.name)
    stages = [Stage(**{**s.to_dict(), "keep": s.keep / REFERENCE_VISUAL if isinstance(s.keep, int) else s.keep})
              for s in cfg.stages]
    return RoutingConfig.from_dict({**cfg.to_dict(), "stages": [s.to_dict() for s in stages]})

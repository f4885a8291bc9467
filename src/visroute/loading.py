"""Loading a supported model and its processor (a local folder or a Hugging Face id), and the dtypes the command
line and the benchmarks accept by name."""

from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device: str | None = "cpu",
               device_map: Any = None, processor_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, processor) of a supported VLM, with SDPA attention, in eval mode: on `device`, or dispatched by
    `device_map` ("auto", a dict, ...) when given; `processor_kwargs` go to the processor (e.g. Qwen's
    `max_pixels`). An architecture no family serves is refused before any weight loads."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from visroute.families import UnsupportedModelError, supported_model_classes

    dtype = dtype_of(dtype) if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(name_or_path)
    archs = set(getattr(config, "architectures", None) or [])
    if archs and not archs & set(supported_model_classes()):
        raise UnsupportedModelError(
            f"{name_or_path} is a {', '.join(sorted(archs))}; visroute supports {', '.join(supported_model_classes())}"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    if device_map is None and device is not None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(name_or_path, **(processor_kwargs or {}))
    return model.eval(), processor

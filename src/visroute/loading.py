"""Loading a supported model and its processor (a local folder, a Hugging Face id, or "testbed": the shipped
testbed checkpoint), and the dtypes the command line and the benchmarks accept by name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from visroute.names import DTYPE_NAMES
from visroute.testbed import candidate_names, checkpoint_path, model_names, model_path

TESTBED = "testbed"  # the model name of the shipped testbed checkpoint, wherever a model is named
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def model_location(name_or_path: str) -> str:
    """The folder or hub id a model name means: "testbed" is the shipped testbed checkpoint's folder, a testbed
    model's name (`visroute.testbed.model_names`, `candidate_names`) its folder."""
    name = str(name_or_path)
    if name == TESTBED:
        return str(checkpoint_path())
    if not Path(name).exists() and name in model_names() + candidate_names():  # a folder of that name wins
        return str(model_path(name))
    return name


def check_model_path(name_or_path: str) -> None:
    """A model that can be found, checked before anything loads: an existing folder, or a hub id that is cached
    (or that the hub, when online, may serve). A path that cannot be a hub id (./x, /x, a/b/c) must be a folder."""
    name_or_path = model_location(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {name_or_path}: a model is a folder (with config.json), not a file")
        return
    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or text.endswith("/") or "\\" in text:
        raise FileNotFoundError(f"model {name_or_path}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "config.json")
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"model {name_or_path}: no such folder (nor a valid hub id)") from None
    if not isinstance(cached, str) and _offline():
        raise FileNotFoundError(f"model {name_or_path}: no folder {name_or_path}, and no cached hub model of that "
                                f"id (the hub is offline)")


def check_device(name: str | None) -> None:
    """A device the installed torch can use (None and "auto" pass), checked before any model loads."""
    if name is None or name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device: str | None = "cpu",
               device_map: Any = None, processor_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, processor) of a supported VLM ("testbed": the shipped testbed checkpoint), with SDPA attention, in
    eval mode: on `device`, or dispatched by `device_map` ("auto", a dict, ...) when given; `processor_kwargs` go
    to the processor (e.g. Qwen's `max_pixels`). An architecture no family serves is refused before any weight
    loads."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from visroute.families import UnsupportedModelError, supported_model_classes

    name_or_path = model_location(name_or_path)
    dtype = dtype_of(dtype) if isinstance(dtype, str) else dtype
    check_model_path(name_or_path)
    if device_map is None:
        check_device(device)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:  # not on the hub, no connection, or a folder without config.json
        raise ValueError(f"model {name_or_path}: {str(e).splitlines()[0]}") from None
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

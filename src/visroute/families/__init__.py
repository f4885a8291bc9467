"""One adapter per model family; `adapter_for(model)` picks it by the model's class."""

from __future__ import annotations

from torch import nn

from visroute.families.base import CallInputs, FamilyAdapter
from visroute.families.llava import LlavaAdapter
from visroute.families.qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (LlavaAdapter, Qwen2VLAdapter)


def supported_model_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    raise TypeError(
        f"visroute does not support {name}. Supported model classes: {', '.join(supported_model_classes())}"
    )


__all__ = ["CallInputs", "FamilyAdapter", "adapter_for", "supported_model_classes"]

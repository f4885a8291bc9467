"""The family registry: one adapter class per model family, found by the model's class (`adapter_for`) or by
a config's `model_type` (`family_for_config`).

    from visroute.families import FamilyAdapter, register_family

    @register_family
    class MyFamily(FamilyAdapter):
        name = "my_vlm"
        model_classes = ("MyVLMForConditionalGeneration",)
        ...

Third-party packages register theirs through the entry-point group `visroute.families` (the entry point names
the adapter class, or a module that registers its adapters when imported); they load the first time the
registry is read.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from visroute.families.base import BOX_FRAMES, CallInputs, FamilyAdapter, ImageFrame, ModelShape
from visroute.registry import Registry

ENTRY_POINT_GROUP = "visroute.families"


class UnsupportedModelError(TypeError):
    """A model (or config) that no registered family serves."""


def _own_shapes(cls: type[FamilyAdapter]) -> tuple[ModelShape, ...]:
    """The bench shapes a family defines itself (a subclass does not inherit its parent's checkpoints)."""
    return tuple(cls.__dict__.get("shapes", ()))


def _shape_names(cls: type[FamilyAdapter]) -> set[str]:
    return {s.name for s in _own_shapes(cls)} | {a for s in _own_shapes(cls) for a in s.aliases}


def _check_family(cls: type[FamilyAdapter], others: dict[str, type[FamilyAdapter]]) -> None:
    """A family serves some model classes, writes boxes in a known frame, and claims no model class, model type
    or shape name another family holds."""
    if not cls.model_classes:
        raise ValueError(f"{cls.__name__} serves no `model_classes`")
    if cls.box_frame not in BOX_FRAMES:
        raise ValueError(f"{cls.__name__}.box_frame {cls.box_frame!r} is not one of {', '.join(BOX_FRAMES)}")
    for other in others.values():
        for attr in ("model_classes", "model_types"):
            taken = set(getattr(cls, attr)) & set(getattr(other, attr))
            if taken:
                raise ValueError(f"{cls.__name__} claims {attr} {sorted(taken)} already served by family {other.name!r}")
        taken = _shape_names(other) & _shape_names(cls)
        if taken:
            raise ValueError(f"{cls.__name__} defines shapes {sorted(taken)} already defined by family {other.name!r}")


REGISTRY: Registry = Registry("model family", FamilyAdapter, ENTRY_POINT_GROUP, check=_check_family)
_FAMILIES = REGISTRY.entries


def register_family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register a family adapter class (usable as a decorator). A name, a model class or a shape name that
    another family already holds is an error."""
    return REGISTRY.register(cls)


def families() -> dict[str, type[FamilyAdapter]]:
    """Every registered family by name (built-in and entry points)."""
    REGISTRY.load()
    return dict(REGISTRY.entries)


def supported_model_classes() -> list[str]:
    return [name for cls in families().values() for name in cls.model_classes]


def family_for_model(model: nn.Module) -> type[FamilyAdapter]:
    """The family serving `model`'s class (or the nearest base class it serves)."""
    served = {name: cls for cls in families().values() for name in cls.model_classes}
    for klass in type(model).__mro__:
        if klass.__name__ in served:
            return served[klass.__name__]
    raise UnsupportedModelError(
        f"visroute does not support {type(model).__name__}. Supported model classes: "
        f"{', '.join(supported_model_classes())}"
    )


def family_for_config(config: Any) -> type[FamilyAdapter]:
    """The family whose models carry `config.model_type` (a model's config, or a model)."""
    config = getattr(config, "config", config)
    kind = getattr(config, "model_type", None)
    for cls in families().values():
        if kind in cls.model_types:
            return cls
    known = [t for cls in families().values() for t in cls.model_types]
    raise UnsupportedModelError(f"No model family serves model type {kind!r}; known: {', '.join(known)}")


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of `model`'s family, bound to it."""
    return family_for_model(model)(model)


def shapes() -> dict[str, ModelShape]:
    """Every registered bench shape by name."""
    return {s.name: s for cls in families().values() for s in _own_shapes(cls)}


def get_shape(name: str) -> ModelShape:
    """A bench shape by its name or one of its aliases (e.g. "llava-1.5" for "llava-1.5-7b")."""
    for s in shapes().values():
        if name == s.name or name in s.aliases:
            return s
    raise ValueError(f"Unknown model shape {name!r}; choose one of {', '.join(shapes())}")


# Importing the built-in families registers them.
from visroute.families.llava import LlavaAdapter  # noqa: E402
from visroute.families.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter  # noqa: E402
from visroute.families.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter  # noqa: E402
from visroute.families.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter  # noqa: E402

for _cls in (LlavaAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter):
    register_family(_cls)
for _cls in (Qwen3VLAdapter, Qwen3VLMoeAdapter, LlavaNextAdapter, LlavaOnevisionAdapter):
    register_family(_cls)

__all__ = [
    "BOX_FRAMES", "CallInputs", "FamilyAdapter", "ImageFrame", "ModelShape", "UnsupportedModelError",
    "adapter_for", "families", "family_for_config", "family_for_model", "get_shape", "register_family",
    "shapes", "supported_model_classes",
]

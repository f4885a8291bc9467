"""Options every subcommand spells the same way (`--dtype`, `--device`, `--debug`, the routing options), and
flags built from a dataclass's fields, so that a default is written once: on the field."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable

from visroute.names import DTYPE_NAMES


class DeferredParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments `build(parser)` adds when it first parses (its --help included), so
    that the help of the command above it lists it without importing what its flags are made from (a dataclass
    in a module that imports torch)."""

    def __init__(self, *args: Any, build: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._build = build

    def parse_known_args(self, args=None, namespace=None):
        if self._build is not None:
            build, self._build = self._build, None
            build(self)
        return super().parse_known_args(args, namespace)


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def add_dtype(p: argparse.ArgumentParser, default: str = "float32") -> None:
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=default, help=f"model dtype (default {default})")


def add_device(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", default=default, help=f"cpu, cuda, cuda:1, ... (default {default})")


def existing_file(path: str | None, what: str) -> Path | None:
    """`path` as a Path, or a FileNotFoundError that names `what` (checked before any model loads)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} at {p}")
    return p


# ---- routing -------------------------------------------------------------------------------------------------
def add_routing(p: argparse.ArgumentParser, repeatable: bool = False) -> None:
    """--config / --action / --scorer / --scorer-option / --stages. With `repeatable`, --config and --stages may
    be given several times (one config each)."""
    many = dict(action="append", default=[]) if repeatable else {}
    p.add_argument("--config", metavar="YAML", help="a routing config file" + (" (repeatable)" if repeatable else ""),
                   **many)
    p.add_argument("--stages", metavar="SPEC", help='a schedule "layer:keep,...", e.g. 2:0.5,7:0.25 (keep with a "." '
                   "is a fraction of the visual tokens, else a count)" + (" (repeatable)" if repeatable else ""), **many)
    p.add_argument("--action", choices=["prune", "reroute"], default="prune", help="action for --stages")
    p.add_argument("--scorer", default="last_token_attention", help="scorer for --stages (`visroute scorers`)")
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a scorer option for --stages, the value read as YAML (repeatable), e.g. reduce=max")
    p.add_argument("--method", metavar="NAME@TIER", help="a named method at an avg_T tier, solved for the model's "
                   "layers and the image's visual tokens, e.g. nuwa@64 (`visroute methods` lists them)"
                   + (" (repeatable)" if repeatable else ""), **(dict(action="append", default=[]) if repeatable else {}))


def parse_scorer_options(items: list[str]) -> dict[str, Any]:
    """["reduce=max", "layer=-2"] -> {"reduce": "max", "layer": -2} (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad --scorer-option {item!r}: expected key=value, e.g. reduce=max")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def routing_from_args(args: argparse.Namespace):
    """The RoutingConfig(s) the routing options describe, fully checked (unknown scorer or option, bad stage
    spec, missing file) without touching any model. Single form: one config or None. Repeatable form: a list
    of (label, config)."""
    from visroute.config import RoutingConfig, parse_stages

    options = parse_scorer_options(args.scorer_option)

    def inline(spec: str) -> RoutingConfig:
        return RoutingConfig(action=args.action, scorer=args.scorer, stages=parse_stages(spec), scorer_options=options)

    specs = getattr(args, "method", None) or []
    specs = [specs] if isinstance(specs, str) else list(specs)
    if isinstance(args.config, list) or isinstance(args.stages, list):
        configs = [(Path(path).stem, RoutingConfig.from_yaml(path)) for path in args.config]
        configs += [(f"{args.action} {spec}", inline(spec)) for spec in args.stages]
        configs += [(spec, method_from_args(spec, args)) for spec in specs]
        return configs
    if sum(bool(x) for x in (args.config, args.stages, specs)) > 1:
        raise ValueError("give one of --config, --stages or --method")
    if args.config:
        return RoutingConfig.from_yaml(args.config)
    if args.stages:
        return inline(args.stages)
    if specs:
        if options:
            raise ValueError("--scorer-option applies to --stages; a --method sets its own scorers")
        return method_from_args(specs[0], args)
    if options:
        raise ValueError("--scorer-option needs --stages")
    return None


def method_budget(args: argparse.Namespace) -> tuple[int, int, str]:
    """(decoder layers, visual tokens of one image, family name) for a `--method`, from what the command names,
    without building a model: a bench `--shape` (and its `--image-size`), or the `--model` folder's config file
    (the shipped testbed model without one) and the `--image` file's size."""
    if getattr(args, "shape", None):
        from visroute.bench.shapes import get_shape, parse_image_size, visual_count

        shape = get_shape(args.shape)
        size = parse_image_size(getattr(args, "image_size", None) or "672x672")
        return shape.num_layers, visual_count(shape.name, size), shape.family
    if getattr(args, "image", None) is None:
        raise ValueError("--method needs the model's layer count and the image's visual tokens (a --shape, or "
                         "--model and --image)")
    from PIL import Image
    from transformers import AutoConfig

    from visroute.families import family_for_config

    path = getattr(args, "model", None)
    if path is None:
        from visroute.testbed import checkpoint_path

        path = str(checkpoint_path())
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"--method cannot read the config of model {path!r}: {e}") from None
    family = family_for_config(config)
    with Image.open(existing_file(args.image, "image")) as im:
        width, height = im.size
    visual = family.visual_tokens(config, height, width)
    if visual is None:
        raise ValueError(f"The {family.name} family cannot say how many visual tokens the image gives")
    return int(config.get_text_config().num_hidden_layers), int(visual), family.name


def method_from_args(spec: str, args: argparse.Namespace):
    """The RoutingConfig of a `--method NAME@TIER` for the model and image the command names."""
    from visroute.methods import method_config, parse_method

    parse_method(spec)  # a bad name or tier fails before anything is read
    layers, visual, family = method_budget(args)
    return method_config(spec, layers, visual, family)


# ---- flags from dataclass fields -------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls` (type, default and help from the field; `choices` from its
    metadata). bool fields get --name / --no-name; tuple and list fields take a YAML value."""
    import yaml

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif tp in (int, float, str):
            kwargs.update(type=tp, default=default, metavar=tp.__name__.upper())
        elif origin in (tuple, list) or tp in (tuple, list):
            kwargs.update(type=yaml.safe_load, default=default, metavar="YAML")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp}")
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        if not has_default:
            kwargs["required"] = True
            kwargs.pop("default", None)
        elif tp is not bool:
            kwargs["help"] = f"{help_text} (default {default!r})" if help_text else f"default {default!r}"
        p.add_argument(_flag(f.name), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **fixed: Any):
    """An instance of `cls` from the flags `add_dataclass_flags` added (YAML lists become tuples where the field
    is a tuple); `fixed` sets fields that have no flag."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        tp = hints[f.name]
        if (typing.get_origin(tp) is tuple or tp is tuple) and isinstance(value, list):
            value = _deep_tuple(value)
        values[f.name] = value
    return cls(**values)


def _deep_tuple(value: Any) -> Any:
    return tuple(_deep_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value

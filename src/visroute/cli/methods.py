"""`visroute methods`: the named methods, their schedules at each tier for one model shape, and their avg_T."""

from __future__ import annotations

import textwrap

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help=COMMANDS["methods"],
                       description="The named methods with their schedules solved at each tier for one model "
                                   "shape (`visroute bench` shapes) and image size, and the avg_T they reach.")
    p.add_argument("--shape", default="llava-1.5-7b", help="model shape (default llava-1.5-7b)")
    p.add_argument("--image-size", default="672x672", help="HxW of the image (Qwen shapes; default 672x672)")
    p.add_argument("--tier", action="append", type=float, default=[], metavar="AVG_T",
                   help="tiers to solve (repeatable; default: the shape's tiers)")
    add_debug(p)
    p.set_defaults(func=run)


def schedule_text(cfg) -> str:
    """One line per config: the action, then each stage as layer:keep with what differs from the config's scorer."""
    parts = []
    for s in cfg.stages:
        extra = []
        if s.scorer:
            opts = "".join(f" {k}={v}" for k, v in s.scorer_options.items())
            extra.append(f"{s.scorer}{opts}")
        if s.score_layer is not None:
            extra.append(f"scored at {s.score_layer}")
        if s.merge:
            extra.append(f"merge {s.merge}")
        if s.action and s.action != cfg.action:
            extra.append(s.action)
        parts.append(f"{s.layer}:{s.keep}" + (f" ({', '.join(extra)})" if extra else ""))
    opts = "".join(f" {k}={v}" for k, v in cfg.scorer_options.items())
    reentry = f", re-entry {cfg.reentry}" if cfg.reentry != "reference" else ""
    return f"{cfg.action}{reentry}, {cfg.scorer}{opts}: " + ", ".join(parts)


def scoring_text(cfg) -> str:
    """Where each decision takes its scores: at its own layer, or at an earlier one."""
    own = [s.layer for s in cfg.stages if s.scoring_layer == s.layer]
    earlier = [f"{s.layer} at {s.scoring_layer}" for s in cfg.stages if s.scoring_layer != s.layer]
    parts = ([f"at its own layer: {', '.join(map(str, own))}"] if own else []) + (
        [f"earlier: {', '.join(earlier)}"] if earlier else [])
    return "scored " + "; ".join(parts)


def run(args) -> int:
    from visroute.bench.shapes import get_shape, parse_image_size, visual_count
    from visroute.methods import listing

    shape = get_shape(args.shape)
    visual = visual_count(shape.name, parse_image_size(args.image_size))
    tiers = tuple(args.tier) or shape.tiers
    print(f"{shape.name}: {shape.num_layers} decoder layers, {visual} visual tokens per image")
    rows = listing(shape.num_layers, visual, shape.family, tiers)
    seen = set()
    for row in rows:
        if row["method"] not in seen:
            seen.add(row["method"])
            print()
            print(row["method"])
            print(textwrap.fill(row["description"], 110, initial_indent="    ", subsequent_indent="    "))
            for spec in row["options"]:
                choices = f" ({' or '.join(map(str, spec.choices))})" if spec.choices else ""
                print(f"    option {spec.name}={spec.default}{choices}: {spec.help}")
        tier = f"{row['tier']:g}"
        if row["config"] is None:
            print(f"  @{tier:<4} out of reach: {row['error']}")
        else:
            print(f"  @{tier:<4} avg_T {row['avg_T']:7.2f}  {schedule_text(row['config'])}")
            if row["config"].stages:
                print(f"{'':8}{scoring_text(row['config'])}")
    return 0

"""`visroute bench`: latency, memory, FLOPs and K/V of a real-shaped random-weight model, routed and unrouted."""

from __future__ import annotations

import json
from pathlib import Path

from visroute.bench.settings import BenchSettings
from visroute.cli import COMMANDS
from visroute.cli.common import (
    add_dataclass_flags,
    add_debug,
    add_routing,
    dataclass_from_args,
    parse_scorer_options,
    routing_from_args,
)
from visroute.names import PRESETS, TIERS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help=COMMANDS["bench"],
        description="Measure prefill and decode latency, peak memory, executed and formula FLOPs and K/V bytes of "
                    "a random-weight model of a named shape, unrouted and under each config, each speedup beside "
                    "the ideal speedup executed FLOPs predict. Without --preset/--config/--stages it runs every "
                    f"preset ({', '.join(PRESETS)}) at every tier of the shape ({', '.join(map(str, TIERS))} for "
                    "LLaVA-1.5 and Qwen2.5-VL).")
    add_dataclass_flags(p, BenchSettings)
    p.add_argument("--preset", action="append", default=[], metavar="NAME@TIER",
                   help="the Reroute reference code's config NAME at one of the shape's tiers, e.g. pdrop@128: the "
                        f"method ref-NAME@TIER (repeatable; with --scorer / --scorer-option for its stages); "
                        f"presets: {', '.join(PRESETS)}")
    add_routing(p, repeatable=True)
    p.add_argument("--out", default=None, help="JSON output file (default: bench_<shape>_<dtype>_<device>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from visroute.bench import format_table, run_bench
    from visroute.budget import parse_preset
    from visroute.cli.common import method_from_args
    from visroute.families import get_shape
    from visroute.methods.reference import PREFIX

    settings = dataclass_from_args(BenchSettings, args)  # checks the shape, counts and image size
    shape = get_shape(settings.shape)
    configs = routing_from_args(args)  # checks files, stage specs, scorer and options before any model is built
    options = parse_scorer_options(args.scorer_option)
    presets = []
    for spec in args.preset:  # --preset NAME@TIER is --method ref-NAME@TIER:scorer=..., at the shape's tiers
        name, tier = parse_preset(spec, shape.tiers)
        cfg = method_from_args(f"{PREFIX}{name}@{tier}:scorer={args.scorer}", args)
        presets.append((spec, dataclasses.replace(cfg, scorer_options=options) if options else cfg))
    configs = presets + configs
    result = run_bench(settings, configs or None, progress=not args.quiet)
    print(format_table(result))
    out = Path(args.out or f"bench_{settings.shape}_{settings.dtype}_{settings.device.replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0

"""`visroute testbed make | train | eval`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from visroute.cli import COMMANDS
from visroute.cli.common import (
    DeferredParser,
    add_dataclass_flags,
    add_debug,
    add_routing,
    dataclass_from_args,
    routing_from_args,
)


def add_parser(sub) -> None:
    p = sub.add_parser("testbed", help=COMMANDS["testbed"])
    tsub = p.add_subparsers(dest="testbed_command", required=True, parser_class=DeferredParser)

    m = tsub.add_parser("make", help="write a question set: images plus items.jsonl (deterministic by seed)")
    m.add_argument("--n", type=int, required=True, help="number of items (families take turns)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--families", help="comma-separated subset of the question families")
    _add_world(m)
    add_debug(m)
    m.set_defaults(func=run_make)

    # its flags come from TrainConfig, in a module that imports torch: added when `testbed train` parses
    tsub.add_parser("train", help="train the testbed model from scratch (resumable)", build=_train_flags)

    e = tsub.add_parser("eval", help="accuracy per family, blind control and retention recall of a routing config")
    add_routing(e)  # --config, --stages (with --action, --scorer, --scorer-option) or --method; none: unrouted
    e.add_argument("--model", help="testbed model: a name (`visroute.testbed.model_names()`) or a checkpoint folder "
                                   "(default: the shipped one)")
    e.add_argument("--data", help="dataset folder from `testbed make` (default: the held-out set, generated)")
    e.add_argument("--n", type=int, default=300, help="size of the generated held-out set")
    e.add_argument("--seed", type=int, default=None, help="seed of the generated set (default: the held-out seed)")
    _add_world(e)
    e.add_argument("--limit", type=int, help="evaluate only the first N items")
    e.add_argument("--blind", action="store_true", help="also run the blind control (image removed)")
    e.add_argument("--unrouted", action="store_true", help="also run the unrouted model next to the config")
    e.add_argument("--by-form", action="store_true",
                   help="also print accuracy per question form (a family's mean can hide an unlearned form)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", help="write the reports (with per-item results) to this file")
    add_debug(e)
    e.set_defaults(func=run_eval)

    b = tsub.add_parser("bars", help="check a testbed checkpoint against the quality it must reach to ship "
                                     "(unrouted bars, blind control, discrimination at one prune stage)")
    b.add_argument("--model", help="testbed model: a name (`visroute.testbed.model_names()`) or a checkpoint folder "
                                   "(default: the shipped one)")
    b.add_argument("--n", type=int, default=900, help="size of the generated held-out set (families take turns)")
    b.add_argument("--seed", type=int, default=None, help="seed of the generated set (default: the held-out seed)")
    _add_world(b)
    b.add_argument("--layer", type=int, default=None, help="layer of the prune stage (default: the bar's, 3)")
    b.add_argument("--keep", type=int, default=None, help="visual tokens it keeps (default: the bar's, 8)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--json", help="write the accuracies and checks to this file")
    add_debug(b)
    b.set_defaults(func=run_bars)

    lay = tsub.add_parser("layers", help="accuracy per family with one random prune stage at every decoder layer")
    lay.add_argument("--model", help="testbed model: a name or a checkpoint folder (default: the shipped one)")
    lay.add_argument("--n", type=int, default=270, help="size of the generated held-out set (families take turns)")
    lay.add_argument("--seed", type=int, default=None, help="seed of the generated set (default: the held-out seed)")
    _add_world(lay)
    lay.add_argument("--keep", type=int, default=None, help="visual tokens the stage keeps (default: the bars', 8)")
    lay.add_argument("--batch-size", type=int, default=64)
    lay.add_argument("--json", help="write the accuracies to this file")
    add_debug(lay)
    lay.set_defaults(func=run_layers)

    c = tsub.add_parser("curve", help="plot a training run's log.jsonl (also while it runs)")
    c.add_argument("run", help="run folder (or its log.jsonl)")
    c.add_argument("--out", help="PNG to write (default: curve.png in the run folder)")
    add_debug(c)
    c.set_defaults(func=run_curve)


def _add_world(p) -> None:
    # resolved at run time (`_world`): the parser must not import the testbed, which imports torch
    p.add_argument("--world", type=int, choices=(2, 3), default=None,
                   help="scene generator: 3 (textures, clutter, distractors, lures; the shipped model's world and the "
                        "default, `visroute.testbed.DEFAULT_WORLD`) or 2 (plain scenes, the v2 model's)")


def _model_name(args) -> str:
    """The model `--model` names, else the shipped one's name."""
    from visroute.testbed import DEFAULT_MODEL

    return args.model or f"{DEFAULT_MODEL} (shipped)"


def _world(args) -> int:
    """The scene generator `--world` names, else the one the shipped model was trained on."""
    from visroute.testbed import DEFAULT_WORLD

    return DEFAULT_WORLD if args.world is None else args.world


def _generated_items(args) -> list:
    """The held-out set `--n`, `--seed` (default: the held-out seed) and `--world` name."""
    from visroute.testbed import HELDOUT_SEED, make_items

    return make_items(args.n, HELDOUT_SEED if args.seed is None else args.seed, world=_world(args))


def run_make(args) -> int:
    from visroute.testbed.data import make_items, write_dataset

    families = [f.strip() for f in args.families.split(",")] if args.families else None
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    path = write_dataset(make_items(args.n, args.seed, families, world=_world(args)), args.out)
    print(f"wrote {args.n} items to {path}")
    return 0


def _train_flags(t) -> None:
    from visroute.testbed.train import RECIPES, TrainConfig

    t.add_argument("--recipe", choices=list(RECIPES), default="v3",
                   help="the recipe whose values the flags not given take (TRAINING.md; default v3; v2: the "
                        "v2 model's recipe, the defaults each flag lists)")
    add_dataclass_flags(t, TrainConfig)
    t.set_defaults(**{f.name: _NOT_GIVEN for f in dataclasses.fields(TrainConfig)})  # see train_config
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--no-progress", action="store_true")
    add_debug(t)
    t.set_defaults(func=run_train)


_NOT_GIVEN = object()  # the parsed value of a train flag that is not on the command line


def train_config(args):
    """The TrainConfig of `testbed train`: the flags given, and the recipe's values (else the listed defaults)
    for the others."""
    from visroute.testbed.train import RECIPES, TrainConfig

    recipe, defaults = RECIPES[args.recipe], TrainConfig()
    missing = {f.name: recipe.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name, _NOT_GIVEN) is _NOT_GIVEN}
    return dataclass_from_args(TrainConfig, args, **missing)


def run_train(args) -> int:
    from visroute.testbed.train import TrainConfig, train

    cfg = train_config(args)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must not be negative")
    if cfg.steps == 0:
        raise ValueError("nothing to train: every phase has 0 steps")
    folder = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"model exported to {folder}; log in {Path(cfg.out) / 'log.jsonl'}, curve in {Path(cfg.out) / 'curve.png'}")
    return 0


def _routing(args):
    """The config to evaluate and its label (a --method is solved for the testbed model's depth and its image's
    visual tokens, which do not depend on the image)."""
    if getattr(args, "method", None):
        from transformers import AutoConfig

        from visroute.families import family_for_config
        from visroute.methods import method_config
        from visroute.testbed import model_path

        config = AutoConfig.from_pretrained(str(model_path(args.model)))
        family = family_for_config(config)
        return method_config(args.method, config.get_text_config().num_hidden_layers, family.visual_tokens(config),
                             family.name), args.method
    config = routing_from_args(args)
    label = Path(args.config).stem if args.config else (f"{args.action} {args.stages}" if config else None)
    return config, label


def run_eval(args) -> int:
    from visroute.testbed import Evaluator, format_table, load_model, read_dataset
    from visroute.testbed.evaluate import format_form_table

    if args.method and (args.config or args.stages):
        raise ValueError("give one of --config, --stages or --method")
    config, label = _routing(args)  # checked before any model loads
    if args.data:
        items = read_dataset(args.data)
    else:
        items = _generated_items(args)
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise ValueError("no items to evaluate")
    model, processor = load_model(args.model)
    ev = Evaluator(model, processor, items, batch_size=args.batch_size)
    reports = {}
    if config is None or args.unrouted:
        reports["unrouted"] = ev.run(None, name="unrouted")
    if config is not None:
        reports[label] = ev.run(config, name=label)
    if args.blind:
        reports["blind"] = ev.run(None, blind=True, name="blind")
    print(f"{len(items)} items; model {_model_name(args)}")
    print(format_table(reports, items))
    if args.by_form:
        print()
        print(format_form_table(reports, items))
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))
        print(f"reports written to {args.json}")
    return 0


def run_bars(args) -> int:
    """Exit status 0 when every bar is met, 1 when one is missed."""
    from visroute.testbed import Evaluator, load_model
    from visroute.testbed.quality import KEEP, LAYER, check_bars, format_bars

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    items = _generated_items(args)
    model, processor = load_model(args.model)
    ev = Evaluator(model, processor, items, batch_size=args.batch_size)
    checks, acc = check_bars(ev, LAYER if args.layer is None else args.layer, KEEP if args.keep is None else args.keep)
    print(f"model {_model_name(args)}")
    print(format_bars(checks, acc, len(items)))
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": acc, "checks": [c.__dict__ for c in checks]}, indent=1))
    return 0 if all(c.met for c in checks) else 1


def run_layers(args) -> int:
    from visroute.testbed import Evaluator, load_model
    from visroute.testbed.quality import KEEP, format_layers, random_by_layer

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    keep = KEEP if args.keep is None else args.keep
    items = _generated_items(args)
    model, processor = load_model(args.model)
    acc = random_by_layer(Evaluator(model, processor, items, batch_size=args.batch_size), keep)
    print(f"model {_model_name(args)}; {len(items)} held-out items, world {_world(args)}")
    print(format_layers(acc, keep))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in acc.items()}, indent=1))
    return 0


def run_curve(args) -> int:
    from visroute.testbed.log import plot_curve

    path = Path(args.run)
    log_path = path
    if path.is_dir():  # a run folder: its log, or the gzip copy a finished run keeps in the repository
        log_path = next((path / n for n in ("log.jsonl", "log.jsonl.gz") if (path / n).exists()), path / "log.jsonl")
    if not log_path.exists():
        raise FileNotFoundError(f"no training log at {log_path}")
    out = Path(args.out) if args.out else log_path.parent / "curve.png"
    plot_curve(log_path, out)
    print(f"curve written to {out}")
    return 0

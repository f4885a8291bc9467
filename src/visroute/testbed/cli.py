"""`visroute testbed make | train | eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("testbed", help="synthetic grounded-VQA scenes, the small testbed model, its evaluation")
    tsub = p.add_subparsers(dest="testbed_command", required=True)

    m = tsub.add_parser("make", help="write a question set: images plus items.jsonl (deterministic by seed)")
    m.add_argument("--n", type=int, required=True, help="number of items (families take turns)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--families", help="comma-separated subset of the question families")
    m.add_argument("--debug", action="store_true", help="show tracebacks")
    m.set_defaults(func=run_make)

    t = tsub.add_parser("train", help="train the testbed model from scratch (resumable)")
    t.add_argument("--out", default="runs/testbed", help="run folder: log, training state, exported model")
    t.add_argument("--symbolic-steps", type=int, default=None, help="phase 1: decoder on symbolic visual tokens")
    t.add_argument("--tower-steps", type=int, default=None, help="phase 2: vision tower and projector alone")
    t.add_argument("--joint-steps", type=int, default=None, help="phase 3: the whole model, end to end")
    t.add_argument("--images", type=int, default=None, help="images per step")
    t.add_argument("--place-rows", type=int, default=None,
                   help="phase 1: extra rows per step asking where a lone object is")
    t.add_argument("--place-until", type=int, default=None, help="phase 1: steps that have the place rows")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate of phases 1 and 2")
    t.add_argument("--joint-lr", type=float, default=None, help="peak learning rate of phase 3")
    t.add_argument("--size", choices=["small", "tiny"], default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--save-every", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--debug", action="store_true")
    t.set_defaults(func=run_train)

    e = tsub.add_parser("eval", help="accuracy per family, blind control and retention recall of a routing config")
    e.add_argument("--config", help="routing config YAML (omit for the unrouted model)")
    e.add_argument("--model", help="testbed checkpoint folder (default: the shipped one)")
    e.add_argument("--data", help="dataset folder from `testbed make` (default: the held-out set, generated)")
    e.add_argument("--n", type=int, default=300, help="size of the generated held-out set")
    e.add_argument("--seed", type=int, default=None, help="seed of the generated set (default: the held-out seed)")
    e.add_argument("--limit", type=int, help="evaluate only the first N items")
    e.add_argument("--blind", action="store_true", help="also run the blind control (image removed)")
    e.add_argument("--unrouted", action="store_true", help="also run the unrouted model next to --config")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", help="write the reports (with per-item results) to this file")
    e.add_argument("--debug", action="store_true")
    e.set_defaults(func=run_eval)


def run_make(args) -> int:
    from visroute.testbed.data import make_items, write_dataset

    families = [f.strip() for f in args.families.split(",")] if args.families else None
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    path = write_dataset(make_items(args.n, args.seed, families), args.out)
    print(f"wrote {args.n} items to {path}")
    return 0


def run_train(args) -> int:
    from visroute.testbed.train import TrainConfig, train

    cfg = TrainConfig(out=args.out)
    for name in ("symbolic_steps", "tower_steps", "joint_steps", "images", "place_rows", "place_until", "lr",
                 "joint_lr", "size", "seed", "threads", "eval_every", "save_every"):
        value = getattr(args, name)
        if value is not None:
            if isinstance(value, int) and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
            setattr(cfg, name, value)
    if cfg.steps == 0:
        raise ValueError("nothing to train: every phase has 0 steps")
    folder = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"model exported to {folder}; log in {Path(cfg.out) / 'log.jsonl'}, curve in {Path(cfg.out) / 'curve.png'}")
    return 0


def run_eval(args) -> int:
    from visroute import RoutingConfig
    from visroute.testbed import HELDOUT_SEED, Evaluator, format_table, load_model, make_items, read_dataset

    if args.data:
        items = read_dataset(args.data)
    else:
        items = make_items(args.n, HELDOUT_SEED if args.seed is None else args.seed)
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise ValueError("no items to evaluate")
    config = RoutingConfig.from_yaml(args.config) if args.config else None
    model, processor = load_model(args.model)
    ev = Evaluator(model, processor, items, batch_size=args.batch_size)
    reports = {}
    if config is None or args.unrouted:
        reports["unrouted"] = ev.run(None, name="unrouted")
    if config is not None:
        reports[Path(args.config).stem] = ev.run(config, name=Path(args.config).stem)
    if args.blind:
        reports["blind"] = ev.run(None, blind=True, name="blind")
    print(f"{len(items)} items; model {args.model or 'shipped testbed checkpoint'}")
    print(format_table(reports, items))
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))
        print(f"reports written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the testbed commands alone (`python -m visroute.testbed.cli ...`)."""
    parser = argparse.ArgumentParser(prog="visroute")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""`visroute lmms`: helpers for running lmms-eval on a routed model (the `visroute` lmms-eval model itself
registers through lmms-eval's entry points): write the testbed as a local lmms-eval task, and print the
model_args of a routing config inline (lmms-eval keys its response cache on that text)."""

from __future__ import annotations

import json

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug, add_routing, routing_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("lmms", help=COMMANDS["lmms"])
    lsub = p.add_subparsers(dest="lmms_command", required=True)
    t = lsub.add_parser("testbed-task", help="write testbed items as Parquet plus an lmms-eval task YAML")
    t.add_argument("--out", required=True, help="folder for the task (use it as --include_path)")
    t.add_argument("--n", type=int, default=120, help="items (families take turns)")
    t.add_argument("--seed", type=int, default=None, help="item set (default: the held-out set)")
    add_debug(t)
    t.set_defaults(func=run_testbed_task)
    a = lsub.add_parser("args", help="print --model_args for `lmms-eval --model visroute` with the routing inline")
    a.add_argument("--pretrained", default="testbed", help="model id or folder (default: the testbed model)")
    add_routing(a)
    a.add_argument("--blind", action="store_true", help="the blind control")
    add_debug(a)
    a.set_defaults(func=run_args)


def run_testbed_task(args) -> int:
    from visroute.integrations.lmms.testbed_task import export_testbed_task
    from visroute.testbed import HELDOUT_SEED, make_items

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    path = export_testbed_task(make_items(args.n, HELDOUT_SEED if args.seed is None else args.seed), args.out)
    print(f"wrote {path} and its data; run: lmms-eval --model visroute --model_args pretrained=testbed "
          f"--tasks {path.stem} --include_path {path.parent}")
    return 0


def run_args(args) -> int:
    parts = [f"pretrained={args.pretrained}"]
    if args.method:
        # a method is solved for the model's layers and visual tokens, which the plug-in knows once it loads the
        # model: pass its name on (`routing=fastv@64` is what lmms-eval's cache keys on)
        from visroute.methods import get_method, parse_method

        if args.config or args.stages or args.scorer_option:
            raise ValueError("give one of --config, --stages or --method (a --method sets its own scorers)")
        get_method(parse_method(args.method)[0])  # a bad name or tier fails here
        parts.append(f"routing={args.method}")
    elif (cfg := routing_from_args(args)) is not None:
        parts.append("routing=" + json.dumps(cfg.to_dict(), separators=(",", ":")))
    parts.append(f"blind={'true' if args.blind else 'false'}")
    print("'" + ",".join(parts) + "'")
    return 0

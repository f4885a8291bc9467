"""`visroute paper-table`: the Reroute paper's table (FastV and PDrop pruning, Reroute matched to each, per tier)
run through lmms-eval on a routed model, gathered into one Markdown table (needs the `lmms` extra)."""

from __future__ import annotations

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug, add_dtype


def add_parser(sub) -> None:
    from visroute.integrations.lmms.paper_table import MODELS, TASKS, TIERS

    p = sub.add_parser("paper-table", help=COMMANDS["paper-table"])
    p.add_argument("--model", required=True, choices=list(MODELS), help="the paper's backbone")
    p.add_argument("--tier", default="all", help=f"avg_T tier: {', '.join(map(str, TIERS))} or all")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated lmms-eval tasks (default: the paper's)")
    p.add_argument("--pretrained", help="model id or local folder (default: the paper's checkpoint)")
    p.add_argument("--include-path", help="folder of task YAMLs (local copies of the datasets, offline)")
    p.add_argument("--out", default="paper_table", help="results folder (runs, side logs, table.md)")
    p.add_argument("--limit", type=int, help="items per task (for a quick look; the table then says nothing)")
    p.add_argument("--batch-size", type=int, default=1)
    add_dtype(p, "bfloat16")
    p.add_argument("--device-map", default="auto", help='"auto" (default) or "none" for the CPU')
    p.add_argument("--dry-run", action="store_true", help="print the runs (done or to do) and their configs")
    add_debug(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from visroute.budget import schedule_avg_T
    from visroute.families import get_shape
    from visroute.integrations.lmms.paper_table import MODELS, TIERS, plan, run_table

    if args.tier == "all":
        tiers = TIERS
    elif args.tier.isdigit() and int(args.tier) in TIERS:
        tiers = (int(args.tier),)
    else:
        raise ValueError(f"--tier must be one of {', '.join(map(str, TIERS))} or all, got {args.tier!r}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks:
        raise ValueError("--tasks names no task")
    runs = plan(args.model, tiers, tasks, args.out)
    if args.dry_run:
        shape = get_shape(MODELS[args.model].shape)
        seen = set()
        for row, task, path, done in runs:
            if row.label not in seen:
                seen.add(row.label)
                if row.config is None:
                    print(f"{row.label}: {'the image removed' if row.blind else 'no routing'}")
                else:
                    avg = schedule_avg_T(row.config, shape.num_layers, 576)
                    stages = ", ".join(f"L{s.layer}:{s.keep}" for s in row.config.stages)
                    print(f"{row.label}: {row.config.action} [{stages}] avg_T {avg:.2f} on {shape.name}")
            print(f"  {'done' if done else 'todo'}  {task:28s} {path}")
        print(f"{sum(not r[3] for r in runs)} of {len(runs)} runs to do")
        return 0
    table = run_table(args.model, tiers, tasks, args.out, pretrained=args.pretrained, include_path=args.include_path,
                      limit=args.limit, batch_size=args.batch_size, dtype=args.dtype,
                      device_map=None if args.device_map == "none" else args.device_map)
    print(table.read_text())
    print(f"table written to {table}")
    return 0

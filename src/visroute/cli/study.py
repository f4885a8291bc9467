"""`visroute study run | list | report`: sweeps of routing configs over benchmark tasks into a results database,
and reports with intervals and plots (visroute.evaluation).

    visroute study run where-to-prune --db results.sqlite            # a shipped grid, on the testbed model
    visroute study run grid.yaml --db results.sqlite --data pope=data/pope.parquet --limit 200
    accelerate launch --multi_gpu --num_processes 4 -m visroute study run grid.yaml --db results.sqlite
    visroute study list --db results.sqlite
    visroute study report --db results.sqlite --out report/
    visroute study grids                                                 # the shipped grids and their paths
    visroute study pooled --db llava.sqlite --db qwen.sqlite --grid grid.yaml --out pooled/   # across models
    visroute study run models.yaml --db study.sqlite     # a grid with `models:`: study.<model>.sqlite for each,
    visroute study report --db study.sqlite --out report/   # study.sqlite their index; each model, then pooled
"""

from __future__ import annotations

import dataclasses
import sys

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug, add_device, add_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("study", help=COMMANDS["study"])
    ssub = p.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    r = ssub.add_parser("run", help="run a grid (resumable: what the database holds is skipped)")
    r.add_argument("grid", help="a grid YAML file, or a shipped grid's name (e.g. where-to-prune)")
    r.add_argument("--db", required=True, help="the results database (SQLite; created if missing)")
    r.add_argument("--limit", type=int, help="at most this many items per task")
    r.add_argument("--data", action="append", default=[], metavar="TASK[.KEY]=PATH",
                   help="a data path of a grid task, by its label (repeatable), e.g. pope=pope.parquet, "
                        "gqa.images=images.parquet")
    r.add_argument("--task", action="append", default=[], metavar="NAME[=PATH]",
                   help="run these tasks instead of the grid's (repeatable), e.g. --task pope=pope.parquet")
    r.add_argument("--model", help="the model instead of the grid's (a folder or hub id; 'testbed')")
    add_dtype(r, default=None)
    add_device(r, default=None)
    r.add_argument("--batch-size", type=int, help="items per batch instead of the grid's")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--strict", action="store_true",
                   help="stop at an item that cannot be run (unreadable image, row without question or answer) "
                        "instead of recording it as skipped")
    add_debug(r)
    r.set_defaults(func=run_study)

    g = ssub.add_parser("grids", help="the shipped grids: name, path and what each sweeps")
    add_debug(g)
    g.set_defaults(func=list_grids)

    ls = ssub.add_parser("list", help="what a results database holds")
    ls.add_argument("--db", required=True)
    add_debug(ls)
    ls.set_defaults(func=list_study)

    rep = ssub.add_parser("report", help="write report.md and PNG plots from a results database (or a study's "
                                         "index over several models: each model, then pooled)")
    rep.add_argument("--db", required=True)
    rep.add_argument("--out", required=True, help="output folder")
    rep.add_argument("--grid", help="test this grid's `primary` contrasts (YAML or shipped name) instead of those "
                                    "recorded in the database when the grid was run")
    rep.add_argument("--delta", type=float, help="the information horizon's margin: best - random below it "
                                                 "(default 0.05, visroute.evaluation.statistics.HORIZON_DELTA)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals and the item split "
                                                         "(default 0)")
    add_debug(rep)
    rep.set_defaults(func=report_study)

    po = ssub.add_parser("pooled", help="write pooled.md: loyalty, primary contrasts (Holm) and the interval "
                                        "horizon across several results databases, one per model")
    po.add_argument("--db", action="append", required=True, help="a results database (repeat: one per model)")
    po.add_argument("--grid", help="the grid (YAML or shipped name) whose `primary` contrasts to test (default: "
                                   "those recorded in the first --db when the grid was run)")
    po.add_argument("--out", required=True, help="output folder")
    po.add_argument("--delta", type=float, help="the horizon's margin: best - random below it (default 0.05, "
                                                "visroute.evaluation.statistics.HORIZON_DELTA)")
    po.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the item split (default 0)")
    add_debug(po)
    po.set_defaults(func=pooled_study)


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"Bad {flag} {text!r}: expected KEY=PATH")
    return key, value


def apply_overrides(grid, args) -> None:
    """--model, --dtype, --device, --batch-size, --task and --data change the loaded grid."""
    from visroute.evaluation.grid import TaskSpec, check_names

    if args.model:  # one of the grid's models (by path or label) with its settings, else the first one's
        spec = next((m for m in grid.models if args.model in (m.path, m.label)), None) or \
            dataclasses.replace(grid.model, path=args.model, label="")
        grid.model, grid.models = spec, [spec]
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    for spec in grid.models:  # grid.model is grid.models[0]
        if args.dtype:
            spec.dtype = args.dtype
        if args.device:
            spec.device, spec.device_map = args.device, None
        if args.batch_size is not None:
            spec.batch_size = args.batch_size
    if args.task:
        tasks = []
        for t in args.task:
            name, _, path = t.partition("=")
            tasks.append(TaskSpec(name=name, data={"data": path} if path else {}))
        grid.tasks = tasks
    labels = {t.label: t for t in grid.tasks}
    for item in args.data:
        key, path = _pair(item, "--data")
        label, _, data_key = key.partition(".")
        if label not in labels:
            raise ValueError(f"--data {item}: the grid has no task {label!r}; its tasks: {', '.join(labels)}")
        labels[label].data[data_key or "data"] = path
    check_names(grid)


def run_study(args) -> int:
    """Run the grid into --db; a grid with several models runs each in turn into a database of its own
    (`visroute.evaluation.layout`)."""
    import os

    from tqdm.auto import tqdm

    from visroute.evaluation import load_grid, run_grid
    from visroute.evaluation.layout import note_primary, open_study
    from visroute.evaluation.store import Store
    from visroute.loading import check_model_path

    grid = load_grid(args.grid)
    apply_overrides(grid, args)
    for spec in grid.models:  # every model found before the first one runs
        check_model_path(spec.path)
    plan = open_study(grid, args.db)
    main = int(os.environ.get("RANK", "0")) == 0  # under a launcher every process has waited for the others
    written: dict[str, dict] = {}
    models = tqdm(plan.items(), desc="models", unit="model", disable=args.no_progress or len(plan) == 1,
                  dynamic_ncols=True)
    try:
        for label, (one, db) in models:
            models.set_postfix_str(label, refresh=True)
            try:
                written[label] = run_grid(one, db, limit=args.limit, progress=not args.no_progress,
                                          strict=args.strict)
            finally:
                note_primary(one, db)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        models.close()
        held = "; ".join(f"{db} holds {_rows(db)} rows (every finished batch)" for _, db in plan.values()
                         if os.path.isfile(db))
        print(f"\nvisroute study run: interrupted; {held + '; ' if held else ''}run the same command again to "
              "resume", file=sys.stderr)
        return 130
    models.close()
    if main:
        for label, (one, db) in plan.items():
            store = Store(db)
            total = sum(store.counts().values())
            runs = len(store.runs())
            skipped = sum(len(v) for v in store.skipped().values())
            store.close()
            rows = sum(n for per in written.get(label, {}).values() for n in per.values())
            print(f"{db}: {total} rows ({rows} new from this process) in {runs} runs (unrouted, blind and each "
                  f"config, on {len(grid.tasks)} task(s))"
                  + (f"; {skipped} item(s) skipped, see `visroute study list`" if skipped else ""))
    return 0


def _rows(db) -> int:
    from visroute.evaluation.store import Store

    store = Store(db)
    try:
        return sum(store.counts().values())
    finally:
        store.close()


def list_grids(args) -> int:
    """Each shipped grid's name and path (copy one to start your own), with the first line of its comment."""
    from visroute.evaluation.grid import shipped_grids

    grids = shipped_grids()
    width = max(len(n) for n in grids)
    for name, path in sorted(grids.items()):
        lines = path.read_text().splitlines()
        about = next((line.lstrip("# ").strip() for line in lines if line.startswith("#")), "")
        print(f"{name:{width}s}  {path}\n{'':{width}s}  {about}")
    return 0


def list_study(args) -> int:
    """What a results database holds; for a multi-model study's index, what each model's database holds."""
    from visroute.evaluation.layout import databases, describe, is_index, primary_contrasts
    from visroute.evaluation.store import Store

    store = Store(args.db)
    ident = store.identity
    store.close()
    contrasts = primary_contrasts(args.db)
    if not is_index(ident):
        _list_one(args.db)
    else:
        print(f"{args.db}: the index of a study over several models, {describe(ident)}; one database each:")
        for label, db in databases(args.db).items():
            print()
            if db.is_file():
                _list_one(db)
            else:
                print(f"{db}: model {label!r} not run yet")
    if contrasts:
        print("primary contrasts: " + "; ".join(f"{c.label} ({c.items})" for c in contrasts))
    return 0


def _list_one(db) -> None:
    from visroute.evaluation.layout import describe
    from visroute.evaluation.store import Store

    store = Store(db)
    try:
        ident = store.identity
        counts = store.counts()
        runs = store.runs()
        expected = store.expected_rows()
        skipped = store.skipped()
    finally:
        store.close()
    print(f"{db}: {describe(ident)}")
    width = max([6] + [len(r.name) for r in runs])
    print(f"{'task':16s} {'config':{width}s} {'kind':9s} {'rows':>7s}")
    for run in runs:
        n = counts.get(run.run_id, 0)
        state = "" if n >= expected[run.task] else f"  (partial: {n} of {expected[run.task]})"
        print(f"{run.task:16s} {run.name:{width}s} {run.kind:9s} {n:7d}{state}")
    for task, reasons in skipped.items():
        print(f"{task}: {len(reasons)} item(s) skipped, never scored:")
        for item, reason in reasons.items():
            print(f"  {item}: {reason}")


def _delta(args) -> dict:
    if args.delta is None:
        return {}
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must lie in (0, 1) (a share of the items), got {args.delta}")
    return {"delta": args.delta}


def report_study(args) -> int:
    from visroute.evaluation.report import write_report

    from visroute.evaluation.grid import load_grid

    contrasts = load_grid(args.grid).primary if args.grid else None
    path = write_report(args.db, args.out, seed=args.seed, contrasts=contrasts, **_delta(args))
    print(f"report written to {path}")
    return 0


def pooled_study(args) -> int:
    from visroute.evaluation.grid import load_grid
    from visroute.evaluation.pooled import write_pooled_report

    from visroute.evaluation.layout import primary_contrasts

    # the grid's declaration, else the one recorded in the first database when its grid was run
    contrasts = load_grid(args.grid).primary if args.grid else primary_contrasts(args.db[0])
    path = write_pooled_report(args.db, args.out, contrasts, seed=args.seed, **_delta(args))
    print(f"pooled report written to {path}")
    return 0

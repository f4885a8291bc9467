"""The evaluation harness: tasks from local benchmark files, the blind control on every task, sweeps of routing
configs into a resumable SQLite database, and reports with intervals and plots.

    from visroute.evaluation import load_grid, run_grid, write_report
    grid = load_grid("where-to-prune")              # a YAML path or a shipped grid's name
    run_grid(grid, "results.sqlite")                # unrouted, blind and every config on every task
    write_report("results.sqlite", "report/")       # report.md and PNG plots

The same from the command line: `visroute study run GRID --db results.sqlite`, `visroute study list --db ...`,
`visroute study report --db ... --out DIR`.
"""

from __future__ import annotations

from visroute.evaluation.grid import ConfigSpec, Grid, ModelSpec, TaskSpec, load_grid, parse_grid, shipped_grids
from visroute.evaluation.runner import Runner, load_model, run_grid
from visroute.evaluation.report import summarize, write_report
from visroute.evaluation.store import Row, Run, Store
from visroute.evaluation.tasks import Task, TaskItem, available_tasks, build_task, get_task_class, register_task

__all__ = [
    "ConfigSpec", "Grid", "ModelSpec", "TaskSpec", "load_grid", "parse_grid", "shipped_grids",
    "Runner", "load_model", "run_grid", "summarize", "write_report", "Row", "Run", "Store",
    "Task", "TaskItem", "available_tasks", "build_task", "get_task_class", "register_task",
]

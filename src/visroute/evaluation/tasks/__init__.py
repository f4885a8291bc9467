"""The task registry. Built-in tasks register with `@register_task`; third-party packages add theirs through the
entry-point group `visroute.tasks` (each entry point loads a Task subclass, or a module that registers some):

    [project.entry-points."visroute.tasks"]
    mytask = "mypackage.tasks:MyTask"
"""

from __future__ import annotations

from visroute.evaluation.tasks.base import Task, TaskItem
from visroute.registry import Registry

ENTRY_POINT_GROUP = "visroute.tasks"


def _builtins() -> None:
    from visroute.evaluation.tasks import datbench, gqa, jsonl, mme, pope, refcoco, testbed  # noqa: F401


REGISTRY: Registry = Registry("task", Task, ENTRY_POINT_GROUP, builtins=_builtins)
_REGISTRY = REGISTRY.entries


def register_task(cls: type[Task], *aliases: str) -> type[Task]:
    """Register a Task subclass under its `name` (and `aliases`); a name taken by another class is an error."""
    return REGISTRY.register(cls, *aliases)


def get_task_class(name: str) -> type[Task]:
    return REGISTRY.get(name)


def build_task(name: str, data=None, limit: int | None = None, **options) -> Task:
    """An instance of the registered task `name`."""
    cls = get_task_class(name)
    task = cls(data=data, limit=limit, **options)
    task.name = name  # an alias (refcoco+) keeps its own name
    return task


def available_tasks() -> dict[str, type[Task]]:
    return REGISTRY.available()


__all__ = ["Task", "TaskItem", "register_task", "get_task_class", "build_task", "available_tasks"]

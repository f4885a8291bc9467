"""The task registry. Built-in tasks register with `@register_task`; third-party packages add theirs through the
entry-point group `visroute.tasks` (each entry point loads a Task subclass, or a module that registers some):

    [project.entry-points."visroute.tasks"]
    mytask = "mypackage.tasks:MyTask"
"""

from __future__ import annotations

from importlib import metadata

from visroute.evaluation.tasks.base import Task, TaskItem

ENTRY_POINT_GROUP = "visroute.tasks"
_REGISTRY: dict[str, type[Task]] = {}
_LOADED = False


def register_task(cls: type[Task], *aliases: str) -> type[Task]:
    """Register a Task subclass under its `name` (and `aliases`); a name taken by another class is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    for name in (cls.name, *aliases):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from visroute.evaluation.tasks import datbench, gqa, jsonl, mme, pope, refcoco, testbed  # noqa: F401

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plug-in says which one it is
            raise ImportError(f"The task entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if isinstance(obj, type) and issubclass(obj, Task):
            register_task(obj)  # a name another class holds is an error


def get_task_class(name: str) -> type[Task]:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}") from None


def build_task(name: str, data=None, limit: int | None = None, **options) -> Task:
    """An instance of the registered task `name`."""
    cls = get_task_class(name)
    task = cls(data=data, limit=limit, **options)
    task.name = name  # an alias (refcoco+) keeps its own name
    return task


def available_tasks() -> dict[str, type[Task]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


__all__ = ["Task", "TaskItem", "register_task", "get_task_class", "build_task", "available_tasks"]

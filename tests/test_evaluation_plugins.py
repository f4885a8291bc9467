"""A third-party task through the entry-point group `visroute.tasks`: a small package installed as metadata
only (a `*.dist-info` folder with `entry_points.txt`) on sys.path publishes the task `prior`, which runs
through `visroute study run` like a built-in one."""

import sqlite3
import sys
import textwrap

import pytest
import yaml

import visroute.evaluation.tasks as tasks_module
from visroute.cli import main

PLUGIN = '''
from visroute.evaluation.tasks import Task, TaskItem


class PriorTask(Task):
    """Text-only questions whose answer the testbed world's prior gives away (no image at all)."""

    name = "prior"
    description = "third-party test task"
    max_new_tokens = 3
    required_keys = ()

    def load(self, limit):
        shapes = {"star": "yellow", "heart": "pink", "moon": "white"}
        return [TaskItem(id=s, question=f"what color is the {s}?", answers=[c]) for s, c in shapes.items()]

    def score(self, item, prediction, frame):
        return {"correct": prediction.strip() == item.answers[0]}
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "visroute_plugin_tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN)
    info = tmp_path / "visroute_plugin_tasks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: visroute_plugin_tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [visroute.tasks]
        prior = visroute_plugin_tasks:PriorTask
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = dict(tasks_module._REGISTRY)
    monkeypatch.setattr(tasks_module, "_LOADED", False)
    yield tmp_path
    tasks_module._REGISTRY.clear()
    tasks_module._REGISTRY.update(registry)
    sys.modules.pop("visroute_plugin_tasks", None)


def test_a_plugin_task_runs_through_study(plugin):
    assert tasks_module.available_tasks()["prior"] is sys.modules["visroute_plugin_tasks"].PriorTask
    grid = {"name": "plugin", "model": {"path": "testbed"}, "tasks": ["prior"],
            "configs": [{"name": "fastv", "config": {"action": "prune", "scorer": "random",
                                                       "stages": [{"layer": 1, "keep": 4}]}}]}
    (plugin / "grid.yaml").write_text(yaml.safe_dump(grid))
    db = plugin / "r.sqlite"
    assert main(["study", "run", str(plugin / "grid.yaml"), "--db", str(db), "--no-progress"]) == 0
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, item_id, correct, avg_T FROM results JOIN runs USING (run_id)").fetchall()
    con.close()
    assert len(rows) == 9 and {r[0] for r in rows} == {"unrouted", "blind", "fastv"}
    assert all(r[3] == 0.0 for r in rows)  # no image: no visual tokens, routing has nothing to act on
    by_run = {(r[0], r[1]): r[2] for r in rows}
    for shape in ("star", "heart", "moon"):
        assert by_run[("unrouted", shape)] == by_run[("blind", shape)] == by_run[("fastv", shape)]

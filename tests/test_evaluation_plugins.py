"""A third-party task through the entry-point group `visroute.tasks`: a small package installed as metadata
only (a `*.dist-info` folder with `entry_points.txt`) on sys.path publishes the task `prior`, which runs
through `visroute study run` like a built-in one."""

import json
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
    registry = dict(tasks_module.available_tasks())  # the built-in tasks, registered once at import
    monkeypatch.setattr(tasks_module.REGISTRY, "loaded", False)  # entry points are read again, now with the plug-in
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


FAKE_DATBENCH = '''
import json

seen = []


class _Refcoco:
    @staticmethod
    def score_sample(sample, model_output):
        seen.append((sample, model_output))
        box = json.loads(model_output)
        return {"score": 1.0 if box == [round(v, 6) for v in sample["bbox"]] else 0.0}


DATASET_SCORING_MODULES = {"refcoco_testA": _Refcoco}
'''


def test_datbench_scorers_get_boxes_in_their_own_frame(tmp_path, monkeypatch):
    """With the `datbench` package importable, its scorer for the row's source dataset decides (score >= 0.5 is
    correct), and a grounding answer reaches it as a normalised box whatever frame the model wrote it in."""
    from visroute.evaluation.tasks import build_task
    from visroute.evaluation.tasks.base import TaskItem
    from visroute.evaluation.tasks.testbed import grid_frame

    (tmp_path / "datbench" / "datasets_scoring").mkdir(parents=True)
    (tmp_path / "datbench" / "__init__.py").write_text("")
    (tmp_path / "datbench" / "datasets_scoring" / "__init__.py").write_text(FAKE_DATBENCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("datbench", "datbench.datasets_scoring"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    truth = [0.25, 0.5, 0.5, 0.75]
    item = TaskItem("1", "where is the red circle?", ["[0.25, 0.5, 0.5, 0.75]"], kind="box", box=truth,
                    meta={"dataset": "refcoco_testA", "capability": "grounding", "answer": "", "metadata":
                          {"bbox": truth}})
    task = build_task("datbench")
    scored = task.score(item, "3 6 6 9", grid_frame((12, 12)))  # the testbed model's grid units
    assert scored["scorer"] == "datbench" and scored["correct"] and scored["iou"] == 1.0
    sample, text = sys.modules["datbench.datasets_scoring"].seen[-1]
    assert json.loads(text) == truth and sample["bbox"] == truth
    assert not build_task("datbench").score(item, "3 6 6 10", grid_frame((12, 12)))["correct"]
    assert "scorer" not in build_task("datbench", own_scorers=False).score(item, "3 6 6 9", grid_frame((12, 12)))

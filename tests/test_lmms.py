"""The lmms-eval plug-in: `lmms-eval --model visroute` on the shipped testbed checkpoint gives the predictions and
accuracy of visroute's own harness, unrouted, routed and blind; its side log has one row per sample; it resolves by
name through the entry point and survives lmms-eval's clean(); RefCOCO-layout data is scored by lmms-eval's own
RefCOCO code after the family's box frame is converted; the paper table's configs hit their tiers.

Runs only where lmms-eval is installed (CI installs it: `pip install -e ".[lmms-core]"` and
`pip install --no-deps lmms-eval==0.7.3`)."""

from __future__ import annotations

import json
import os

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from visroute import RoutingConfig, Stage  # noqa: E402
from visroute.testbed import make_items, write_dataset  # noqa: E402

N = 24
ROUTED = RoutingConfig("reroute", "last_token_attention", [Stage(1, 24), Stage(4, 12)])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["LMMS_EVAL_DATASETS_CACHE"] = str(root / "cache")
    from visroute.integrations.lmms.testbed_task import export_testbed_task

    items = make_items(N, seed=1000)
    export_testbed_task(items, root / "task")
    write_dataset(items, root / "data")
    return root, items


@pytest.fixture(scope="module")
def lm(env):
    from visroute.integrations.lmms.model import VisrouteLMM

    root, _ = env
    return VisrouteLMM(pretrained="testbed", dtype="float32", batch_size=8, side_log=str(root / "side"))


def evaluate(lm, root, task="visroute_testbed"):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(root / "task"), include_defaults=False, model_name="visroute")
    res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return res["results"][task], samples


def harness(root, config, blind=False):
    """visroute's own harness on the same items: {item id: (prediction, correct, avg_T)}."""
    from visroute.evaluation import Store, parse_grid, run_grid

    grid = {"name": "lmms-check", "version": 1, "model": {"path": "testbed", "dtype": "float32", "batch_size": 8},
            "tasks": [{"name": "testbed", "data": str(root / "data")}]}
    if config is not None:
        grid["configs"] = [{"name": "routed", "config": config.to_dict()}]
    db = root / f"harness-{'blind' if blind else 'routed' if config else 'unrouted'}.sqlite"
    run_grid(parse_grid(grid), db, progress=False)
    store = Store(db)
    want = "blind" if blind else ("routed" if config is not None else "unrouted")
    run = next(r for r in store.runs() if r.name == want)
    return {row.item_id: (row.prediction, row.correct, row.avg_T) for row in store.rows(run.run_id)}


def side_rows(lm):
    return [json.loads(line) for line in lm.side_log.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("config, blind", [(None, False), (ROUTED, False), (None, True)],
                         ids=["unrouted", "routed", "blind"])
def test_lmms_eval_gives_the_harness_predictions(env, lm, config, blind):
    root, items = env
    lm.set_routing(config, blind=blind, side_log=root / f"side-{config is not None}-{blind}")
    results, samples = evaluate(lm, root)
    ours = harness(root, config, blind)
    predictions = [" ".join(s["filtered_resps"][0].split()) for s in samples]
    assert predictions == [ours[it.id][0] for it in items]
    assert [s["accuracy"] for s in samples] == [float(ours[it.id][1]) for it in items]
    assert results["accuracy,none"] == pytest.approx(sum(ours[it.id][1] for it in items) / N)
    rows = side_rows(lm)
    assert sorted(r["doc_id"] for r in rows) == list(range(N))  # one row per sample
    by_doc = {r["doc_id"]: r for r in rows}
    for i, it in enumerate(items):
        expect = 0.0 if blind else ours[it.id][2] if config is not None else 144.0
        assert by_doc[i]["avg_T"] == pytest.approx(expect if expect is not None else 144.0)
        if config is not None:
            assert by_doc[i]["kv_entries"] < by_doc[i]["kv_entries_unrouted"]
            if it.relevant_tokens:  # retention recall of the question's tokens, per stage
                assert len(by_doc[i]["recall"]) == 2 and all(0 <= v <= 1 for v in by_doc[i]["recall"])
            else:
                assert by_doc[i]["recall"] is None


def test_the_model_resolves_by_name_and_survives_clean(env):
    from lmms_eval.models import get_model

    from visroute.integrations.lmms.model import VisrouteLMM

    root, _ = env
    cls = get_model("visroute")
    assert cls is VisrouteLMM
    lm = cls.create_from_arg_string(f"pretrained=testbed,dtype=float32,routing=fastv@64,side_log={root / 'named'}",
                                    {"batch_size": 12, "device": None})
    assert lm.config is not None and lm.config.action == "prune" and lm.batch_size == 12
    first, _ = evaluate(lm, root)
    second, _ = evaluate(lm, root)  # lmms-eval called lm.clean() after the first run
    assert first["accuracy,none"] == second["accuracy,none"]
    assert "routing={" in str(lm)  # what lmms-eval keys the response cache of an instance on


REC_YAML = """\
task: visroute_testbed_bbox_rec
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: rec.parquet
test_split: test
output_type: generate_until
process_docs: !function lmms_eval.tasks.refcoco.utils_rec.refcoco_bbox_rec_preprocess_dataset
doc_to_visual: !function lmms_eval.tasks.refcoco.utils_rec.refcoco_bbox_rec_doc_to_visual
doc_to_text: !function visroute.integrations.lmms.testbed_task.where_is
doc_to_target: bbox
process_results: !function lmms_eval.tasks.refcoco.utils_rec.refcoco_bbox_rec_process_result
metric_list:
  - metric: refcoco_ACC@0.5
    aggregation: !function lmms_eval.tasks.refcoco.utils_rec.refcoco_bbox_rec_acc05
    higher_is_better: true
generation_kwargs:
  max_new_tokens: 5
"""


def test_refcoco_layout_is_scored_by_lmms_eval_after_the_frame_is_converted(env, tmp_path):
    """RefCOCO's public layout (bbox as x, y, w, h pixels; a list of referring expressions) from testbed
    grounding items, run through lmms-eval's own RefCOCO preprocessing and scoring: the testbed model writes
    boxes in grid units, which the plug-in converts (box_frame=grid) to lmms-eval's normalised frame."""
    from datasets import Dataset, Features, Image, Sequence, Value

    from visroute.integrations.lmms.model import VisrouteLMM
    from visroute.testbed.scenes import PATCH

    root, _ = env
    items = make_items(12, seed=1000, families=["grounding"])
    rows = []
    for k, it in enumerate(items):
        x1, y1, x2, y2 = it.box
        rows.append({"question_id": str(k), "image": it.image(), "answer": [it.question[len("where is the "):-1]],
                     "bbox": [x1 * PATCH, y1 * PATCH, (x2 - x1) * PATCH, (y2 - y1) * PATCH]})
    features = Features({"question_id": Value("string"), "image": Image(), "answer": Sequence(Value("string")),
                         "bbox": Sequence(Value("float64"))})
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    Dataset.from_list(rows, features=features).to_parquet(str(task_dir / "rec.parquet"))
    (task_dir / "rec.yaml").write_text(REC_YAML)
    lm = VisrouteLMM(pretrained="testbed", dtype="float32", batch_size=6, box_frame="grid", side_log=str(tmp_path))
    results, samples = evaluate(lm, tmp_path, task="visroute_testbed_bbox_rec")
    # the harness's grounding accuracy on the same items, from its own scoring in grid units
    from visroute.testbed import Evaluator, load_model

    model, processor = load_model()
    ours = Evaluator(model, processor, items, progress=False).run(None)
    assert results["refcoco_ACC@0.5,none"] == pytest.approx(ours.accuracy()["grounding"])
    assert all(s["filtered_resps"][0].startswith("[") for s in samples)  # converted to normalised boxes
    rows = side_rows(lm)
    assert all(r["raw_prediction"] != r["prediction"] for r in rows)

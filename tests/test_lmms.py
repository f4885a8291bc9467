"""The lmms-eval plug-in: `lmms-eval --model visroute` on the shipped testbed checkpoint gives the predictions and
accuracy of visroute's own harness, unrouted, routed and blind; its side log has one row per sample; it resolves by
name through the entry point and survives lmms-eval's clean(); RefCOCO-layout data is scored by lmms-eval's own
RefCOCO code after the family's box frame is converted; the paper table's configs hit their tiers.

Runs only where lmms-eval is installed (CI installs it: `pip install -e ".[lmms-core]"` and
`pip install --no-deps lmms-eval==0.7.3`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from visroute import RoutingConfig, Stage  # noqa: E402
from visroute.testbed import make_items, write_dataset  # noqa: E402

N = 24
ROUTED = RoutingConfig("reroute", "last_token_attention", [Stage(1, 24), Stage(4, 12)])


@pytest.fixture(autouse=True, scope="module")
def pil_default_for_truncated_images():
    """lmms-eval sets PIL's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` when its tasks load; the test modules
    after this one get PIL's default back (the harness's tests expect a truncated image to be unreadable)."""
    yield
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


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


MULTI_YAML = """\
task: visroute_multi_bbox_rec
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: docs.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
"""

MULTI_UTILS = """\
def doc_to_visual(doc):
    return [im.convert("RGB") for im in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
"""


def test_the_plugin_and_the_harness_agree_on_tiled_and_multi_image_samples(tmp_path, monkeypatch):
    """A tiny LLaVA-NeXT (tiled frames) with one or two images per sample, routed by the oracle from each
    sample's box: lmms-eval through the plug-in and `study run` give the same predictions, relevant tokens, avg_T
    and retention recall (both go through the harness's `Session`, which sizes relevance by the sample's visual
    tokens: every tile of every image)."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value
    from PIL import Image
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    import visroute.evaluation.tasks as tasks_module
    from tiny import NEXT_PINPOINTS, tiny_llava_next, tiny_llava_processor
    from visroute.evaluation import Store, parse_grid, run_grid
    from visroute.evaluation.tasks import Task, TaskItem
    from visroute.integrations.lmms.model import VisrouteLMM

    model = tiny_llava_next()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=NEXT_PINPOINTS),
        tokenizer=tiny_llava_processor(model).tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    sizes = [[(64, 20)], [(64, 64), (16, 64)], [(20, 64)], [(90, 70), (64, 32)]]  # (width, height) per image
    docs = []
    for k, images in enumerate(sizes):
        pictures = [Image.fromarray(np.random.default_rng(k * 10 + j).integers(0, 255, (h, w, 3), dtype=np.uint8))
                    for j, (w, h) in enumerate(images)]
        docs.append({"id": str(k), "question": "what is the colour of the shape ?", "answer": "red",
                     "images": pictures, "bbox": [0.1, 0.2, 0.6, 0.7]})

    class MultiTask(Task):
        name = "visroute_multi_test"
        max_new_tokens = 4
        required_keys = ()

        def load(self, limit):
            return [TaskItem(id=d["id"], question=d["question"], answers=[d["answer"]], kind="box", box=d["bbox"],
                             images=lambda d=d: [im.convert("RGB") for im in d["images"]]) for d in docs]

        def score(self, item, prediction, frame):
            return {"correct": prediction.strip() == item.answers[0]}

    registry = dict(tasks_module.available_tasks())
    tasks_module.register_task(MultiTask)
    monkeypatch.setattr(tasks_module.REGISTRY, "loaded", True)
    oracle = RoutingConfig("prune", "oracle", [Stage(1, 40), Stage(3, 6)])  # stage 1 keeps every relevant token
    grid = {"name": "multi", "model": {"path": str(tmp_path / "model"), "dtype": "float32", "batch_size": 1},
            "tasks": ["visroute_multi_test"], "configs": [{"name": "oracle", "config": oracle.to_dict()}]}
    try:
        run_grid(parse_grid(grid), tmp_path / "r.sqlite", progress=False)
    finally:
        tasks_module._REGISTRY.clear()
        tasks_module._REGISTRY.update(registry)
    store = Store(tmp_path / "r.sqlite")
    run = next(r for r in store.runs() if r.name == "oracle")
    ours = {row.item_id: row for row in store.rows(run.run_id)}
    unrouted = {row.item_id: row for row in store.rows(next(r for r in store.runs() if r.name == "unrouted").run_id)}
    store.close()

    task_dir = tmp_path / "task"
    task_dir.mkdir()
    features = Features({"id": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "images": Sequence(ImageFeature()), "bbox": Sequence(Value("float64"))})
    Dataset.from_list(docs, features=features).to_parquet(str(task_dir / "docs.parquet"))
    (task_dir / "multi.yaml").write_text(MULTI_YAML)
    (task_dir / "utils.py").write_text(MULTI_UTILS)
    lm = VisrouteLMM(pretrained=str(tmp_path / "model"), routing=oracle, dtype="float32", batch_size=1,
                     box_convert=False, side_log=str(tmp_path / "side"))
    _, samples = evaluate(lm, tmp_path, task="visroute_multi_bbox_rec")
    rows = {r["doc_id"]: r for r in side_rows(lm)}
    for s in samples:
        mine = ours[str(s["doc_id"])]
        assert " ".join(s["filtered_resps"][0].split()) == " ".join(mine.prediction.split())
        side = rows[s["doc_id"]]
        assert side["relevant"] == mine.routing["relevant"] and side["relevant"][0]
        assert side["avg_T"] == pytest.approx(mine.avg_T)
        assert side["recall"] == pytest.approx([stage[0] for stage in mine.recall])
    assert len(samples) == len(docs) and all(r["recall"][0] == 1.0 > r["recall"][1] for r in rows.values())
    # both count every visual token of the sample (the harness's unrouted avg_T); the relevant ones lie in the first
    # image, which on a two-image sample holds only part of them
    for doc_id, r in rows.items():
        assert r["num_visual"] == unrouted[str(doc_id)].avg_T > max(r["relevant"][0])

"""Tiny files in each public layout (POPE, GQA, MME, RefCOCO, DatBench rows, generic JSONL), written from
testbed images and questions, run through `visroute study run` on the shipped testbed model.

The same questions on the same images also run as the `testbed` task, so every reader, prompt and box
conversion is checked against an independent path: an item's correctness under each layout must equal its
correctness as a testbed item."""

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from visroute.cli import main
from visroute.testbed import DEFAULT_WORLD, HELDOUT_SEED, make_items, write_dataset

N = 6  # items per family


def source_items():
    """N testbed items of each family used (one seed per family: item ids stay unique)."""
    fams = ("existence", "attribute", "counting", "grounding")
    return {f: make_items(N, HELDOUT_SEED + 7 + i, [f]) for i, f in enumerate(fams)}


def write_layouts(root: Path) -> dict[str, dict]:
    """The data files of every layout under `root`; returns the grid's task entries."""
    import datasets
    from datasets import Features, Image, Sequence, Value

    fams = source_items()
    everything = [it for items in fams.values() for it in items]
    write_dataset(everything, root / "testbed")
    tasks = {"testbed": {"name": "testbed", "data": str(root / "testbed")}}

    pope = [{"question_id": it.id, "question": it.question, "answer": it.answer, "image": it.image(),
             "category": it.subtype} for it in fams["existence"]]
    datasets.Dataset.from_list(pope).cast_column("image", Image()).to_parquet(str(root / "pope.parquet"))
    tasks["pope"] = {"name": "pope", "data": str(root / "pope.parquet"),
                     "options": {"instruction": "", "normalization": "lmms"}}

    gqa = [{"id": it.id, "imageId": f"img{it.id}", "question": it.question, "answer": it.answer,
            "fullAnswer": f"It is {it.answer}."} for it in fams["attribute"]]
    datasets.Dataset.from_list(gqa).to_parquet(str(root / "gqa_instructions.parquet"))
    images = [{"id": f"img{it.id}", "image": it.image()} for it in fams["attribute"]]
    datasets.Dataset.from_list(images).cast_column("image", Image()).to_parquet(str(root / "gqa_images.parquet"))
    tasks["gqa"] = {"name": "gqa", "data": {"data": str(root / "gqa_instructions.parquet"),
                                            "images": str(root / "gqa_images.parquet")}, "options": {"instruction": ""}}

    # MME: two questions per image (question_id names the image); here the same question twice
    mme = [{"question_id": f"existence/{it.id}.png", "image": it.image(), "question": it.question,
            "answer": it.answer.capitalize(), "category": "existence"} for it in fams["existence"] for _ in range(2)]
    datasets.Dataset.from_list(mme).cast_column("image", Image()).to_parquet(str(root / "mme.parquet"))
    tasks["mme"] = {"name": "mme", "data": str(root / "mme.parquet"), "options": {"instruction": ""}}

    # RefCOCO as lmms-eval stores it: bbox [x, y, w, h] in pixels, a list of referring expressions; saved with
    # datasets.save_to_disk (a DatasetDict with one split)
    patch = 192 // 12
    ref = []
    for it in fams["grounding"]:
        x1, y1, x2, y2 = it.box
        ref.append({"question_id": it.id, "image": it.image(), "bbox": [x1 * patch, y1 * patch, (x2 - x1) * patch,
                    (y2 - y1) * patch], "answer": [it.question]})
    features = Features({"question_id": Value("string"), "image": Image(), "bbox": Sequence(Value("float32")),
                         "answer": Sequence(Value("string"))})
    splits = datasets.DatasetDict({"val": datasets.Dataset.from_list(ref, features=features)})
    splits.save_to_disk(str(root / "refcoco"))
    tasks["refcoco"] = {"name": "refcoco", "data": str(root / "refcoco"), "options": {"prompt": "{expression}"}}

    # DatBench rows: grounding (metadata.bbox normalised), counting, short answers
    rows = []
    for it in fams["grounding"]:
        meta = {"bbox": [v / 12 for v in it.box]}
        rows.append(_datbench_row(it, "refcoco_testA", it.answer, meta))
    for it in fams["counting"]:
        rows.append(_datbench_row(it, "countbench", it.answer, {}))
    for it in fams["attribute"]:
        rows.append(_datbench_row(it, "vqav2", it.answer, {"question_type": "what color"}))
    datasets.Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(root / "datbench.parquet"))
    tasks["datbench"] = {"name": "datbench", "data": str(root / "datbench.parquet"), "options": {"own_scorers": False}}

    # generic JSONL: image paths relative to the file, a metric per row
    with (root / "generic.jsonl").open("w") as f:
        for it in fams["counting"] + fams["grounding"]:
            row = {"id": it.id, "image": f"testbed/images/{it.id}.png", "question": it.question, "answer": it.answer,
                   "metric": "number" if it.family == "counting" else "box_iou"}
            if it.family == "grounding":
                row["box"] = [v / 12 for v in it.box]
            f.write(json.dumps(row) + "\n")
    tasks["jsonl"] = {"name": "jsonl", "data": str(root / "generic.jsonl")}
    return tasks


def _datbench_row(it, dataset, answer, meta):
    return {"id": it.id, "image": it.image(), "question": it.question, "prompt_format": {"prefix": "", "suffix": ""},
            "answer": answer, "all_answers": [answer], "eval_mode": "direct", "judge_prompt": "",
            "is_circular": False, "source_info": {"dataset": dataset, "original_idx": it.id},
            "metadata": json.dumps(meta)}


def write_grid(path: Path, tasks: list[dict], configs=None, sweep=None, name="layouts", version=1) -> Path:
    grid = {"name": name, "version": version, "model": {"path": "testbed", "batch_size": 8}, "tasks": tasks}
    if configs:
        grid["configs"] = configs
    if sweep:
        grid["sweep"] = sweep
    path.write_text(yaml.safe_dump(grid))
    return path


ORACLE = {"name": "oracle", "config": {"action": "prune", "scorer": "oracle", "stages": [{"layer": 2, "keep": 0.25}]}}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tasks = write_layouts(root)
    grid = write_grid(root / "grid.yaml", list(tasks.values()), configs=[ORACLE])
    db = root / "results.sqlite"
    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress"]) == 0
    return root, db


def _rows(db, task, run="unrouted"):
    con = sqlite3.connect(db)
    out = con.execute("SELECT item_id, prediction, correct, metrics_json, recall_json FROM results JOIN runs "
                      "USING (run_id) WHERE runs.task = ? AND runs.name = ?", (task, run)).fetchall()
    con.close()
    return {r[0]: (r[1], bool(r[2]), json.loads(r[3]), None if r[4] is None else json.loads(r[4])) for r in out}


def test_every_layout_runs_unrouted_blind_and_routed(layouts):
    _, db = layouts
    con = sqlite3.connect(db)
    counts = dict(((t, n), c) for t, n, c in con.execute(
        "SELECT task, name, COUNT(*) FROM results JOIN runs USING (run_id) GROUP BY task, name"))
    con.close()
    expected = {"testbed": 4 * N, "pope": N, "gqa": N, "mme": 2 * N, "refcoco": N, "datbench": 3 * N, "jsonl": 2 * N}
    for task, n in expected.items():
        assert counts[(task, "unrouted")] == n and counts[(task, "blind")] == n, task
    # the oracle needs relevance: it runs where items carry it (testbed hops, boxes) and is skipped elsewhere
    assert counts[("testbed", "oracle")] == 4 * N and counts[("refcoco", "oracle")] == N
    assert ("pope", "oracle") not in counts and ("gqa", "oracle") not in counts


@pytest.mark.parametrize("task,strip", [("pope", None), ("gqa", None), ("mme", "#"), ("refcoco", "#"),
                                        ("datbench", None), ("jsonl", None)])
def test_layouts_score_like_the_testbed(layouts, task, strip):
    _, db = layouts
    for run in ("unrouted", "blind"):
        truth = {k: v[1] for k, v in _rows(db, "testbed", run).items()}
        got = _rows(db, task, run)
        assert got
        for item_id, (pred, correct, metrics, _) in got.items():
            tid = item_id.split(strip)[0] if strip else item_id
            tid = tid.split("/")[-1].removesuffix(".png")
            assert correct == truth[tid], (task, run, item_id, pred, metrics)


def test_box_relevance_maps_to_the_tokens_the_objects_paint(layouts):
    """Retention recall on box tasks comes from `ImageFrame.tokens_of`; the testbed's hops are patch boxes.
    Under the oracle (which keeps the relevant tokens first) a budget at least the size of an item's relevant
    set keeps all of it."""
    _, db = layouts
    grounding = {it.id: it for it in source_items()["grounding"]}
    rec_testbed = _rows(db, "testbed", "oracle")
    for item_id, it in grounding.items():
        rec = rec_testbed[item_id][3]
        if len(it.relevant_tokens) <= 36:
            assert rec == [[1.0]]
    for item_id, (_, _, _, rec) in _rows(db, "refcoco", "oracle").items():
        it = grounding[item_id.split("#")[0]]
        x1, y1, x2, y2 = it.box
        assert len(rec) == 1 and (rec[0][0] == 1.0) == ((x2 - x1) * (y2 - y1) <= 36)


@pytest.mark.parametrize("world", [2, 3])
def test_testbed_hops_map_back_to_the_relevant_tokens(world):
    """Per hop, the harness's regions cover exactly the item's relevant tokens (world 3: the tokens an object
    shows where another covers it)."""
    from visroute.evaluation.tasks.testbed import to_task_item
    from visroute.families import ImageFrame

    frame = ImageFrame(width=192, height=192, view=(0.0, 0.0, 192.0, 192.0), rows=12, cols=12, canvas=(192, 192),
                       box_frame="grid")
    for it in make_items(12 if world == 2 else 45, HELDOUT_SEED, world=world):
        hops = to_task_item(it).hops
        tokens = [sorted({t for box in hop for t in frame.tokens_of(box)}) for hop in hops]
        assert sorted({t for h in tokens for t in h}) == sorted(it.relevant_tokens)
        if getattr(it, "hops", None):
            assert tokens == [sorted(h) for h in it.hops]


def test_testbed_task_generates_the_world_it_is_given():
    from visroute.evaluation.tasks import build_task

    def questions(items):
        return [(it.question, it.answers[0] if hasattr(it, "answers") else it.answer) for it in items]

    three, two = make_items(6, HELDOUT_SEED, world=3), make_items(6, HELDOUT_SEED, world=2)
    assert questions(three) != questions(two)  # the two worlds draw different scenes and questions
    assert questions(build_task("testbed", n=6, world=3).load(None)) == questions(three)
    assert questions(build_task("testbed", n=6, world=2).load(None)) == questions(two)
    # without the option: the world the shipped model was trained on
    assert DEFAULT_WORLD == 3 and questions(build_task("testbed", n=6).load(None)) == questions(three)
    with pytest.raises(ValueError, match="world must be 2 or 3"):
        build_task("testbed", n=6, world=4).load(None)


def test_study_list_shows_the_runs(layouts, capsys):
    _, db = layouts
    assert main(["study", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "grid 'layouts'" in out and "refcoco" in out and "oracle" in out and "partial" not in out


def test_report_of_every_layout(layouts):
    """The report has a section per task with the task's own metrics; MME's score is recomputed here from the
    stored correctness: 100 acc + 100 acc+ (both questions of an image right)."""
    from collections import defaultdict

    from visroute.evaluation import summarize, write_report
    from visroute.evaluation.store import Store

    root, db = layouts
    text = write_report(db, root / "report").read_text()
    for task in ("testbed", "pope", "gqa", "mme", "refcoco", "datbench", "jsonl"):
        assert f"## {task}\n" in text
    assert "| f1 | yes_ratio |" in text and "| perception | cognition |" in text and "| iou | center_acc |" in text
    store = Store(db)
    mme = {s.name: s for s in summarize(store)["mme"]}
    store.close()
    for name in ("unrouted", "blind"):
        per_image = defaultdict(list)
        for item_id, (_, correct, _, _) in _rows(db, "mme", name).items():
            per_image[item_id.split("#")[0]].append(correct)
        answers = [c for v in per_image.values() for c in v]
        expected = 100 * sum(answers) / len(answers) + 100 * sum(all(v) for v in per_image.values()) / len(per_image)
        assert mme[name].task_metrics["perception"] == pytest.approx(expected)


def test_command_line_overrides(layouts):
    """--task replaces the grid's tasks, --data sets a task's path by its label, --limit caps every task."""
    root, _ = layouts
    grid = write_grid(root / "one.yaml", [{"name": "pope", "data": str(root / "nowhere.parquet")}], name="overrides")
    db = root / "overrides.sqlite"
    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress", "--limit", "3",
                 "--data", f"pope={root / 'pope.parquet'}"]) == 0
    assert len(_rows(db, "pope")) == 3
    db2 = root / "overrides2.sqlite"
    assert main(["study", "run", str(grid), "--db", str(db2), "--no-progress", "--limit", "4",
                 "--task", f"jsonl={root / 'generic.jsonl'}", "--batch-size", "3"]) == 0
    assert len(_rows(db2, "jsonl")) == 4 and not _rows(db2, "pope")

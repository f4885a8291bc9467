"""Evaluation on real data: bad items are skipped with their reason (or stop the run under --strict), keeps mean
what they say, lists and reports say what is partial or missing, two writers and Ctrl-C lose nothing, and the
first-day mistakes are one line each, before any model loads."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import visroute.evaluation.runner as runner_module
import visroute.loading
import visroute.testbed
from visroute import Stage
from visroute.cli import main
from visroute.evaluation import parse_grid
from visroute.evaluation.store import Row, Store

GOOD = ["g0", "g1", "g2", "g3"]
# case -> (how its row differs from a good one, what the stored reason says)
BAD = {
    "truncated": ({"image": "trunc.png"}, "truncated"),
    "not_an_image": ({"image": "fake.png"}, "cannot identify image file"),
    "missing_image": ({"image": "nowhere.png"}, "does not exist"),
    "no_answer": ({"answer": "drop"}, "no answer"),
    "null_answer": ({"answer": None}, "no answer"),
    "no_question": ({"question": ""}, "no question"),
}
FASTV = {"action": "prune", "scorer": "last_token_attention", "stages": [{"layer": 2, "keep": 16}]}
BIG = {"action": "prune", "scorer": "last_token_attention", "stages": [{"layer": 2, "keep": 500}]}


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)


def _row(item_id: str, **change) -> dict:
    row = {"id": item_id, "image": f"{item_id}.png", "question": "what color is it?", "answer": "red"}
    row.update(change)
    if row.get("answer") == "drop":
        del row["answer"]
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(root: Path) -> None:
    for i, name in enumerate(GOOD):
        _png(root / f"{name}.png", i)
    _png(root / "trunc.png", 9)
    data = (root / "trunc.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: int(len(data) * 0.6)])
    (root / "fake.png").write_text("this is not an image\n")
    bad = [_row(case, **change) for case, (change, _) in BAD.items()]
    good = [_row(g) for g in GOOD]
    # batches of 2: good and bad items side by side, then bad ones only
    _write_jsonl(root / "rows.jsonl", [x for pair in zip(good, bad) for x in pair] + bad[len(good):])
    _write_jsonl(root / "allbad.jsonl", [_row("x0", image="fake.png"), _row("x1", image="fake.png")])


def _grid(root: Path, tasks: list[dict], configs=None, name="trust") -> Path:
    grid = {"name": name, "model": {"path": "testbed", "batch_size": 2}, "tasks": tasks,
            "configs": configs if configs is not None else [{"name": "k16", "config": FASTV}]}
    path = root / f"{name}-{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _run(argv: list) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def _said(err: str) -> list[str]:
    """What visroute wrote to stderr (transformers' own "Loading weights" bar aside)."""
    return [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]


def _table(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _snapshot(db: Path) -> tuple:
    return (_table(db, "SELECT * FROM results ORDER BY run_id, item_id"),
            _table(db, "SELECT * FROM skipped ORDER BY task, item_id"))


@pytest.fixture(scope="module")
def bad_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    _data(root)
    grid = _grid(root, [{"name": "jsonl", "label": "bad", "data": str(root / "rows.jsonl")},
                        {"name": "jsonl", "label": "allbad", "data": str(root / "allbad.jsonl")}],
                 [{"name": "k16", "config": FASTV}, {"name": "big", "config": BIG}])
    db = root / "results.sqlite"
    rc, err = _run(["study", "run", grid, "--db", db, "--no-progress"])
    assert rc == 0, err
    return root, grid, db, err


# ---- 1. bad data: one line, nothing lost ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_item_is_skipped_with_its_reason_and_never_scored(bad_study, case):
    _, _, db, err = bad_study
    reasons = dict(_table(db, "SELECT item_id, reason FROM skipped WHERE task = 'bad'"))
    assert BAD[case][1] in reasons[case]
    assert _table(db, f"SELECT COUNT(*) FROM results WHERE item_id = '{case}'") == [(0,)]
    assert f"item {case}: " in err  # said when it happened, one line


def test_the_run_goes_on_past_bad_items(bad_study):
    _, _, db, _ = bad_study
    per_run = _table(db, "SELECT name, GROUP_CONCAT(item_id) FROM results JOIN runs USING (run_id) "
                         "WHERE task = 'bad' GROUP BY name")
    assert {name for name, _ in per_run} == {"unrouted", "blind", "k16", "big"}
    assert all(sorted(ids.split(",")) == GOOD for _, ids in per_run)


def test_study_list_counts_skipped_items_and_nothing_partial(bad_study, capsys):
    _, _, db, _ = bad_study
    assert main(["study", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "bad: 6 item(s) skipped, never scored:" in out and "allbad: 2 item(s) skipped" in out
    assert "partial" not in out


def test_report_writes_the_other_tasks_and_names_the_task_without_rows(bad_study):
    root, _, db, _ = bad_study
    out = root / "report"
    rc, err = _run(["study", "report", "--db", db, "--out", out])
    assert rc == 0, err
    text = (out / "report.md").read_text()
    assert "**Task allbad has no rows.**" in text and "## bad" in text and "| k16 | 4 |" in text
    assert "**Skipped in bad:** 6 of 10 items could not be run" in text


@pytest.mark.parametrize("case", list(BAD))
def test_strict_stops_naming_the_file_and_the_item(bad_study, tmp_path, case):
    root, _, db, _ = bad_study
    change, reason = BAD[case]
    data = _write_jsonl(root / f"strict-{case}.jsonl", [_row("g0"), _row(case, **change)])
    grid = _grid(root, [{"name": "jsonl", "label": "bad", "data": str(data)}], [{"name": "k16", "config": FASTV}],
                 name="strict")
    copy = tmp_path / "copy.sqlite"
    rc, err = _run(["study", "run", grid, "--db", copy, "--no-progress", "--strict"])
    assert rc == 2 and len(_said(err)) == 1, err
    assert f"({data}), item {case}: " in err and reason in err
    if "image" in change:  # found when its batch is read, before anything of that batch is stored
        assert _table(copy, "SELECT COUNT(*) FROM results") == [(0,)]
    else:  # a row without question or answer: found before the model loads and the database is made
        assert not copy.exists()


def test_strict_leaves_a_database_unchanged(bad_study, tmp_path):
    _, grid, db, _ = bad_study
    copy = tmp_path / "copy.sqlite"
    shutil.copy(db, copy)
    before = _snapshot(copy)
    rc, err = _run(["study", "run", grid, "--db", copy, "--no-progress", "--strict"])
    assert rc == 2 and len(_said(err)) == 1 and "item no_answer: its row has no answer" in err
    assert _snapshot(copy) == before


def test_a_fixed_image_is_run_on_resume(tmp_path):
    _data(tmp_path)
    rows = _write_jsonl(tmp_path / "two.jsonl", [_row("g0"), _row("truncated", image="trunc.png")])
    grid = _grid(tmp_path, [{"name": "jsonl", "data": str(rows)}])
    db = tmp_path / "r.sqlite"
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    assert [r[0] for r in _table(db, "SELECT item_id FROM skipped")] == ["truncated"]
    _png(tmp_path / "trunc.png", 9)  # the user replaces the truncated file
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    assert _table(db, "SELECT COUNT(*) FROM results WHERE item_id = 'truncated'") == [(3,)]
    assert _table(db, "SELECT COUNT(*) FROM skipped") == [(0,)]


def test_generate_reads_its_image_before_loading_the_model(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the image was read")

    monkeypatch.setattr(visroute.loading, "load_model", refuse)
    _png(tmp_path / "t.png", 1)
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "f.png").write_text("text")
    for name, message in (("t.png", "truncated"), ("f.png", "cannot identify image file")):
        t0 = time.perf_counter()
        rc = main(["generate", "--image", str(tmp_path / name), "--prompt", "what is it?"])
        err = capsys.readouterr().err
        assert rc == 2 and len(_said(err)) == 1 and f"cannot read image {tmp_path / name}" in err and message in err
        assert time.perf_counter() - t0 < 1.0


def test_a_truncated_image_stays_unreadable_when_pil_is_told_to_load_truncated_files(tmp_path, monkeypatch):
    """lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES process-wide on import; the harness still refuses the file."""
    from PIL import ImageFile

    from visroute.evaluation.tasks.base import UnreadableImage, to_image

    _png(tmp_path / "t.png", 1)
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnreadableImage, match="truncated"):
        to_image("t.png", tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process-wide setting is left as it was


# ---- 2. keeps mean what they say ---------------------------------------------------------------------------------
def test_a_float_keep_above_one_is_an_error_naming_the_count():
    with pytest.raises(ValueError, match=r"Stage.keep 16.0 is a float above 1.*write 16 for a count or a fraction"):
        Stage(3, 576 / 36)
    with pytest.raises(ValueError, match=r"write an int for a count"):
        Stage(3, 1.5)
    assert Stage(3, 1.0).keep_count(144) == 144 and Stage(3, 16).keep_count(144) == 16


def test_a_float_keep_in_a_grid_is_refused_before_the_model(tmp_path, capsys):
    sweep = {"name": "g", "model": "testbed", "tasks": ["testbed"],
             "sweep": [{"scorer": "random", "layers": [3], "keep": [16.0]}]}
    with pytest.raises(ValueError, match=r"sweep 1: keep 16.0: .*write 16 for a count"):
        parse_grid(sweep)
    listed = {"name": "g", "model": "testbed", "tasks": ["testbed"],
              "configs": [{"name": "x", "config": {**FASTV, "stages": [{"layer": 2, "keep": 16.0}]}}]}
    with pytest.raises(ValueError, match=r"config 'x'.*write 16 for a count"):
        parse_grid(listed)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(sweep))
    db = tmp_path / "r.sqlite"
    assert main(["study", "run", str(tmp_path / "g.yaml"), "--db", str(db)]) == 2
    assert "write 16 for a count" in capsys.readouterr().err and not db.exists()
    _png(tmp_path / "i.png", 0)
    assert main(["generate", "--image", str(tmp_path / "i.png"), "--prompt", "q", "--stages", "3:16.0"]) == 2
    assert "write 16 for a count" in capsys.readouterr().err


def test_a_fraction_keep_is_never_named_as_a_count():
    grid = parse_grid({"name": "g", "model": "testbed", "tasks": ["testbed"],
                       "sweep": [{"scorer": "random", "layers": [3], "keep": [1.0, 0.25, 16]}]})
    assert [c.name for c in grid.configs] == ["prune/random/L3/k1.0", "prune/random/L3/k0.25", "prune/random/L3/k16"]


def test_a_keep_above_the_candidates_is_noted_in_the_run_and_the_report(bad_study, tmp_path):
    _, _, db, err = bad_study
    assert "note: big on 'bad': a stage's keep exceeds the visual tokens" in err and "note: k16" not in err
    assert _run(["study", "report", "--db", db, "--out", tmp_path])[0] == 0
    text = (tmp_path / "report.md").read_text()
    assert "Note: in big, a stage's keep exceeds the visual tokens of 4 of 4 items" in text
    assert "Note: in k16" not in text


# ---- 3 and 4. partial runs, Ctrl-C, two writers -----------------------------------------------------------------
def _interrupt_after(monkeypatch, calls: int) -> None:
    original = runner_module.Session.generate
    seen = []

    def generate(self, *args, **kwargs):
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Session, "generate", generate)


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A sweep of 6 items in batches of 2, interrupted (Ctrl-C) after the first batch of every run."""
    grid = _grid(tmp_path, [{"name": "testbed", "limit": 6}])
    db = tmp_path / "r.sqlite"
    _interrupt_after(monkeypatch, 3)  # unrouted, blind and k16 of the first batch
    rc, err = _run(["study", "run", grid, "--db", db, "--no-progress"])
    monkeypatch.undo()
    return grid, db, rc, err


def test_ctrl_c_says_what_is_saved_and_how_to_resume(interrupted):
    grid, db, rc, err = interrupted
    assert rc == 130 and "Traceback" not in err
    assert f"interrupted; {db} holds 6 rows (every finished batch); run the same command again to resume" in err
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    assert _table(db, "SELECT COUNT(*), COUNT(DISTINCT run_id || item_id) FROM results") == [(18, 18)]


def test_a_run_stopped_between_batches_is_listed_and_reported_as_partial(interrupted, capsys, tmp_path):
    _, db, _, _ = interrupted
    assert main(["study", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.count("(partial: 2 of 6)") == 3  # every run stopped at the same batch: measured against the task
    assert main(["study", "report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    head = (tmp_path / "rep" / "report.md").read_text().split("## testbed")[0]
    assert "**Partial:** 3 of 3 runs hold fewer rows than their task's items" in head
    assert "- testbed / k16: 2 of 6" in head


def test_a_writer_whose_plan_is_stale_stores_every_row_once(tmp_path, monkeypatch):
    """A second process planned before the first stored its rows: it re-plans per batch (its claim finds them
    stored) and adds nothing."""
    grid = _grid(tmp_path, [{"name": "testbed", "limit": 4}])
    db = tmp_path / "r.sqlite"
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    before = _table(db, "SELECT * FROM results ORDER BY run_id, item_id")
    monkeypatch.setattr(Store, "done", lambda self, run_id: set())  # the plan sees an empty database
    generated = []
    original = runner_module.Session.generate
    monkeypatch.setattr(runner_module.Session, "generate",
                        lambda self, *a, **k: generated.append(1) or original(self, *a, **k))
    rc, err = _run(["study", "run", grid, "--db", db, "--no-progress"])
    assert rc == 0, err
    assert generated == [] and _table(db, "SELECT * FROM results ORDER BY run_id, item_id") == before


def _claim_first_batch(db: Path, owner: str) -> None:
    """`owner` claims the first two items of the unrouted run (their rows not stored yet), as a process computing
    them would."""
    first = _unrouted_items(db)[:2]
    store = Store(db)
    run = next(r for r in store.runs() if r.name == "unrouted")
    store.conn.executemany("DELETE FROM results WHERE run_id = ? AND item_id = ?", [(run.run_id, i) for i in first])
    assert store.claim(run.run_id, first, owner) == set(first)
    store.close()


def _unrouted_items(db: Path) -> list[str]:
    return [r[0] for r in _table(db, "SELECT item_id FROM results JOIN runs USING (run_id) "
                                     "WHERE name = 'unrouted' ORDER BY item_id")]


def test_items_another_running_process_claimed_are_left_to_it(tmp_path):
    from visroute.evaluation.store import process_owner

    grid = _grid(tmp_path, [{"name": "testbed", "limit": 4}])
    db = tmp_path / "r.sqlite"
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    items = _unrouted_items(db)
    _claim_first_batch(db, process_owner().rsplit(":", 1)[0] + f":{__import__('os').getppid()}")  # alive
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    assert _unrouted_items(db) == items[2:]  # its batch is left to the claiming process
    assert len(_table(db, "SELECT * FROM claims")) == 2  # this process released its own claims


def test_a_claim_of_a_process_that_is_gone_is_taken_over(tmp_path):
    from visroute.evaluation.store import process_owner

    grid = _grid(tmp_path, [{"name": "testbed", "limit": 4}])
    db = tmp_path / "r.sqlite"
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    items = _unrouted_items(db)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _claim_first_batch(db, process_owner().rsplit(":", 1)[0] + ":" + gone.stdout.strip())
    assert _run(["study", "run", grid, "--db", db, "--no-progress"])[0] == 0
    assert _unrouted_items(db) == items and _table(db, "SELECT * FROM claims") == []


def test_insert_or_ignore_keeps_the_first_row(tmp_path):
    store = Store(tmp_path / "r.sqlite", {"grid": "g"})
    run = store.run("a", "routed", "t", "h", {}, None, "a", "m", {}, {})
    assert store.add(run.run_id, [Row("1", "first", True, {})]) == 1
    assert store.add(run.run_id, [Row("1", "second", False, {}), Row("2", "x", False, {})]) == 1
    assert [(r.item_id, r.prediction) for r in store.rows(run.run_id)] == [("1", "first"), ("2", "x")]
    store.close()


def test_two_sweeps_on_one_database_both_finish_with_every_row_once(tmp_path):
    grid = _grid(tmp_path, [{"name": "testbed", "limit": 8}])
    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "visroute", "study", "run", str(grid), "--db", str(db), "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("Traceback" not in err for _, err in outs)
    assert _table(db, "SELECT COUNT(*), COUNT(DISTINCT run_id || '/' || item_id) FROM results") == [(24, 24)]


# ---- 5. first-day mistakes: one line, exit 2, before any model, nothing stored changed --------------------------
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(visroute.loading, "load_model", refuse)
    monkeypatch.setattr(visroute.testbed, "load_model", refuse)
    monkeypatch.setattr(runner_module, "load_model", refuse)


def _one_line(argv: list, *messages: str) -> str:
    rc, err = _run(argv)
    assert rc == 2 and len(_said(err)) == 1, err
    for m in messages:
        assert m in err, err
    return err


def _testbed_grid(tmp_path: Path) -> Path:
    return _grid(tmp_path, [{"name": "testbed", "limit": 2}])


def test_cuda_on_a_cpu_only_torch(no_model, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    db = tmp_path / "r.sqlite"
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db, "--device", "cuda"], "sees no CUDA GPU",
              "use --device cpu")
    _one_line(["generate", "--image", _image(tmp_path), "--prompt", "q", "--device", "cuda"], "sees no CUDA GPU")
    assert not db.exists()


def _image(tmp_path: Path) -> Path:
    _png(tmp_path / "i.png", 0)
    return tmp_path / "i.png"


def test_a_misspelled_device(no_model, tmp_path):
    db = tmp_path / "r.sqlite"
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db, "--device", "gpu"], "unknown device 'gpu'")
    _one_line(["generate", "--image", _image(tmp_path), "--prompt", "q", "--device", "gpu"], "unknown device 'gpu'")
    assert not db.exists()


def test_a_hub_id_not_cached_offline(no_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = tmp_path / "r.sqlite"
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db, "--model", "nobody-xyz/not-a-cached-model"],
              "no cached hub model of that id (the hub is offline)")
    assert not db.exists()


def test_a_local_folder_that_does_not_exist_is_not_taken_for_a_hub_id(no_model, tmp_path):
    db = tmp_path / "r.sqlite"
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db, "--model", "./models/llava-typo"],
              "model ./models/llava-typo: no such folder")
    _one_line(["generate", "--image", _image(tmp_path), "--prompt", "q", "--model", "models/llava/typo"],
              "no such folder")
    assert not db.exists()


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n\n", "is empty"),
    ("broken.jsonl", '{"image": "a.png", "question": "q", "answer": "a"}\n{"image": "b.png", \n', "line 2 of"),
    ("empty.parquet", "", "is empty"),
    ("garbage.parquet", "PAR1 not really parquet", "cannot read"),
])
def test_an_empty_or_malformed_data_file(no_model, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    db = tmp_path / "r.sqlite"
    err = _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db, "--task", f"jsonl={tmp_path / name}"],
                    message, str(tmp_path / name))
    assert "Traceback" not in err and not db.exists()


def test_a_folder_as_db(no_model, tmp_path):
    (tmp_path / "adir").mkdir()
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", tmp_path / "adir"], "is a folder; give a database file")
    _one_line(["study", "list", "--db", tmp_path / "adir"], "is a folder")
    assert list((tmp_path / "adir").iterdir()) == []


def test_a_foreign_sqlite_database_as_db(no_model, tmp_path):
    db = tmp_path / "other.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    before = db.read_bytes()
    _one_line(["study", "run", _testbed_grid(tmp_path), "--db", db], "an SQLite database of something else (tables t)")
    assert db.read_bytes() == before and _table(db, "PRAGMA journal_mode") == [("delete",)]


# ---- 6. layouts as downloaded -------------------------------------------------------------------------------------
def _pope_rows(with_id: bool) -> list[dict]:
    rows = []
    for c, category in enumerate(("adversarial", "popular", "random")):
        for q in (1, 2):  # the original files number questions within each category
            row = {"question_id": q, "question": f"Is there a cat? ({category})", "answer": [" Yes", "no "][q - 1],
                   "image": {"bytes": _png_bytes(c * 2 + q), "path": None}, "category": category}
            if with_id:
                row["id"] = 100 + c * 2 + q
            rows.append(row)
    return rows


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[dict]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_pope_with_question_ids_repeated_across_categories(tmp_path):
    from visroute.evaluation import build_task

    hub = _parquet(tmp_path / "hub.parquet", _pope_rows(with_id=True))
    assert [it.id for it in build_task("pope", data=str(hub)).items()] == [str(i) for i in range(101, 107)]
    original = _parquet(tmp_path / "original.parquet", _pope_rows(with_id=False))
    items = build_task("pope", data=str(original)).items()
    assert [it.id for it in items][:3] == ["adversarial-1", "adversarial-2", "popular-1"]
    assert [it.answers for it in items[:2]] == [["yes"], ["no"]]  # read as lmms-eval reads them: lower, stripped


def test_a_hub_snapshot_folder_of_parquet_shards(tmp_path):
    from visroute.evaluation import build_task

    rows = _pope_rows(with_id=True)
    snap = tmp_path / "POPE"
    (snap).mkdir()
    (snap / "README.md").write_text("---\nconfigs: ...\n---\n")
    _parquet(snap / "data" / "test-00000-of-00002.parquet", rows[:3])
    _parquet(snap / "data" / "test-00001-of-00002.parquet", rows[3:])
    assert [it.id for it in build_task("pope", data=str(snap)).items()] == [str(i) for i in range(101, 107)]
    # a subset folder of one shard per split (POPE's Full/): a split is chosen, or all of them
    for category, part in (("adversarial", rows[:2]), ("popular", rows[2:4]), ("random", rows[4:])):
        _parquet(snap / "Full" / f"{category}-00000-of-00001.parquet", part)
    with pytest.raises(ValueError, match=r"holds the splits \['adversarial', 'popular', 'random'\]; choose one"):
        build_task("pope", data=str(snap / "Full")).items()
    popular = build_task("pope", data=str(snap / "Full"), split="popular").items()
    assert [it.id for it in popular] == ["1", "2"]  # question_id is unique within a split
    assert len(build_task("pope", data=str(snap / "Full"), split="all").items()) == 6
    # the same shards for the generic task, a plain folder of them
    plain = [{"image": {"bytes": _png_bytes(i), "path": None}, "question": "q", "answer": "a"} for i in range(3)]
    _parquet(tmp_path / "shards" / "train-00000-of-00001.parquet", plain)
    assert len(build_task("jsonl", data=str(tmp_path / "shards")).items()) == 3


def test_pope_answers_are_read_as_lmms_eval_reads_them(tmp_path):
    """lmms-eval's POPE (`pope_process_results`): prediction and answer lower-cased and stripped, then compared
    whole: "Yes." is not "yes". LLaVA's rule reads the first sentence, so "Yes." is yes there."""
    from visroute.evaluation import build_task

    path = _parquet(tmp_path / "p.parquet", _pope_rows(with_id=True))
    lmms = build_task("pope", data=str(path), normalization="lmms")
    llava = build_task("pope", data=str(path))
    item = lmms.items()[0]  # answer " Yes"
    assert lmms.score(item, " YES ", None)["correct"] and not lmms.score(item, "Yes.", None)["correct"]
    assert lmms.score(item, "Yes.", None)["lmms"] == "other" and llava.score(item, "Yes.", None)["correct"]


# ---- 7. plots and the command line --------------------------------------------------------------------------------
def test_a_control_at_one_layer_is_drawn_and_layer_ticks_are_integers(tmp_path):
    from visroute.evaluation.report import pyplot, plot_scorer_lines

    plt = pyplot()
    fig, ax = plt.subplots()
    plot_scorer_lines(ax, {"random": {3: 0.5}, "last_token_attention": {2: 0.6, 3: 0.7}})
    control = next(line for line in ax.get_lines() if line.get_label() == "random")
    assert control.get_marker() not in (None, "None", "") and len(control.get_xdata()) == 1
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)


def test_pareto_points_carry_their_config_and_action(tmp_path, monkeypatch):
    from visroute.evaluation.report import RunSummary, pyplot, plot_pareto
    from visroute.evaluation.store import Run

    def summary(name, kind, config, avg_T, acc):
        return RunSummary(Run(0, name, kind, "t", "h", {}, config, "c", "m"), {}, acc, (acc, acc), avg_T=avg_T)

    cfg = {"action": "prune", "scorer": "random", "stages": [{"layer": 2, "keep": 16}]}
    runs = [summary("unrouted", "unrouted", None, 144.0, 0.9), summary("prune/random/L2/k16", "routed", cfg, 20, 0.5),
            summary("fastv@64", "routed", {**cfg, "scorer": "last_token_attention"}, 64, 0.8)]
    texts = []
    original = pyplot().Axes.annotate
    monkeypatch.setattr(pyplot().Axes, "annotate",
                        lambda ax, text, *a, **k: texts.append(text) or original(ax, text, *a, **k))
    assert plot_pareto(runs, tmp_path / "p.png", "t")
    assert sorted(texts) == ["fastv@64 (prune)", "prune/random/L2/k16", "unrouted"]


def test_single_stage_reroute_and_prune_are_identical_by_definition():
    from visroute.evaluation.report import RunSummary, reroute_vs_prune
    from visroute.evaluation.store import Run

    rows = {str(i): Row(str(i), "a", bool(i % 2), {}) for i in range(6)}

    def summary(action, stages):
        cfg = {"action": action, "scorer": "random", "stages": stages, "scorer_options": {}}
        return RunSummary(Run(0, f"{action}/{len(stages)}", "routed", "t", "h", {}, cfg, "c", "m"), rows, 0.5,
                          (0.5, 0.5))

    one, two = [{"layer": 2, "keep": 16}], [{"layer": 2, "keep": 16}, {"layer": 4, "keep": 8}]
    pairs = reroute_vs_prune([summary("prune", one), summary("reroute", one), summary("prune", two),
                              summary("reroute", two)])
    assert [(p["reroute"], p["identical"]) for p in pairs] == [("reroute/1", True), ("reroute/2", False)]
    assert "diff" not in pairs[0] and pairs[1]["diff"] == 0.0


def test_help_builds_without_torch():
    code = ("import sys, contextlib, io\nfrom visroute.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_lazy_help_lines_match_the_full_parser():
    from visroute.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {c.dest: c.help for c in sub._choices_actions} == COMMANDS


def test_the_readme_documents_every_grid_key():
    """The README's grid block holds every key the parser takes (the parser's own key sets, so a new key cannot
    go undocumented), and parses; its commented `models:` line parses as a multi-model grid."""
    from visroute.evaluation.grid import CONFIG_KEYS, CONTRAST_KEYS, GRID_KEYS, SWEEP_KEYS, TASK_KEYS, ModelSpec

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("### The grid format", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    grid = yaml.safe_load(block)
    assert set(grid) | {"models"} == GRID_KEYS and "\n# models:" in block
    assert set(grid["model"]) == set(ModelSpec.__dataclass_fields__)
    assert set(grid["tasks"][0]) == TASK_KEYS
    assert set().union(*grid["configs"]) == CONFIG_KEYS
    assert set().union(*grid["sweep"]) | {"avg_T"} == SWEEP_KEYS and "# avg_T:" in block
    assert set().union(*grid["primary"]) == CONTRAST_KEYS
    grid["configs"] = [c for c in grid["configs"] if not isinstance(c.get("config"), str)]  # no file here
    parsed = parse_grid(grid)
    names = [c.name for c in parsed.configs]
    assert "mine" in names and "prune/random/L{layer}/k0.25" in names and "reroute/random/L0.25-0.5-0.75/k16" in names
    assert "prune/random-s4/L2/k0.25" in names and len(parsed.primary) == 2
    models_line = next(l for l in block.splitlines() if l.startswith("# models:"))
    shared = {k: v for k, v in grid["model"].items() if k not in ("path", "label")}
    multi = parse_grid({**grid, "model": shared, **yaml.safe_load(models_line[2:].split("#")[0])})
    assert [m.label for m in multi.models] == ["testbed-v2", "testbed-v3-b-drop4k"] and multi.models[1].batch_size == 8


def test_study_grids_lists_the_shipped_grids_and_their_paths(capsys):
    from visroute.evaluation.grid import shipped_grids

    assert main(["study", "grids"]) == 0
    out = capsys.readouterr().out
    for name, path in shipped_grids().items():
        assert f"{name}" in out and str(path) in out and path.is_file()


# ---- 8. one sizing of relevance for the harness and the lmms-eval plug-in -----------------------------------------
def test_relevance_is_sized_by_each_samples_visual_tokens_on_tiled_and_multi_image_samples():
    """`item_frames` (what the harness's session and the lmms-eval plug-in both call) counts a sample's visual
    tokens as the processor lays them out (oracle: its image placeholders), not as one grid's rows x cols; the
    oracle scorer accepts relevance of that size and keeps the relevant tokens."""
    import torch
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tiny import IMAGE_TOKEN, NEXT_PINPOINTS, tiny_llava_next, tiny_llava_processor
    from visroute import RoutingConfig, apply_routing
    from visroute.evaluation.runner import item_frames, recall, relevance_vector
    from visroute.families import adapter_for
    from visroute.families.llava_next import LlavaNextAdapter

    model = tiny_llava_next()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=NEXT_PINPOINTS),
        tokenizer=tiny_llava_processor(model).tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>")
    images = [[Image.new("RGB", (64, 20), (200, 40, 40))],  # one tiled image
              [Image.new("RGB", (64, 64), (40, 200, 40)), Image.new("RGB", (16, 64), (40, 40, 200))]]  # two
    texts = [LlavaNextAdapter.plain_prompt("what is it ?", len(ims), "<image>") for ims in images]
    inputs = processor(images=[im for ims in images for im in ims], text=texts, padding=True, return_tensors="pt")
    frames, counts = item_frames(adapter_for(model), processor, images, inputs, None)
    assert counts == inputs["input_ids"].eq(IMAGE_TOKEN).sum(1).tolist()
    assert all(n > fr[0].rows * fr[0].cols for n, fr in zip(counts, frames))  # the sizing the plug-in had
    tokens = [fr[0].tokens_of([0.0, 0.0, 0.5, 0.5]) for fr in frames]
    relevance = [relevance_vector(n, [t]) for n, t in zip(counts, tokens)]
    cfg = RoutingConfig("prune", "oracle", [Stage(1, max(len(t) for t in tokens))])
    with apply_routing(model, cfg) as router, router.call_options(relevance=relevance), torch.no_grad():
        model(**inputs)
    active = router.last_record.stages[0].active
    assert [recall(active[b], tokens[b]) for b in range(2)] == [1.0, 1.0]


def test_lmms_args_passes_a_method_by_name(capsys):
    assert main(["lmms", "args", "--method", "reroute-pdrop@36"]) == 0
    assert capsys.readouterr().out.strip() == "'pretrained=testbed,routing=reroute-pdrop@36,blind=false'"
    assert main(["lmms", "args", "--method", "fastvv@64"]) == 2
    err = capsys.readouterr().err
    assert len(_said(err)) == 1 and "Unknown method 'fastvv'" in err
    assert main(["lmms", "args", "--method", "fastv@64", "--stages", "2:0.5"]) == 2


def test_a_refusal_names_what_differs_from_the_database(tmp_path):
    grid = _testbed_grid(tmp_path)
    db = tmp_path / "r.sqlite"
    Store(db, parse_grid(yaml.safe_load(grid.read_text())).identity()).close()
    before = db.read_bytes()
    err = _one_line(["study", "run", grid, "--db", db, "--dtype", "bfloat16"], "holds results of another grid")
    assert "dtype float32" in err and "dtype bfloat16" in err and db.read_bytes() == before

"""Each kind of bad input gets a clear error naming the thing, and leaves no results behind."""

import json
import sqlite3

import pytest
import yaml

from visroute.cli import main
from visroute.evaluation import build_task, load_grid, parse_grid, run_grid

CONFIG = {"name": "fastv", "config": {"action": "prune", "scorer": "last_token_attention",
                                      "stages": [{"layer": 2, "keep": 16}]}}


def grid(tasks=None, configs=None, **extra):
    return {"name": "bad", "model": {"path": "testbed", "batch_size": 4},
            "tasks": tasks or [{"name": "testbed", "limit": 4}], "configs": configs or [CONFIG], **extra}


def test_unknown_task():
    with pytest.raises(ValueError, match=r"Unknown task 'popee'.*pope"):
        parse_grid(grid(tasks=[{"name": "popee", "data": "x.parquet"}]))


def test_unknown_scorer_and_option():
    bad = {"name": "x", "config": {"action": "prune", "scorer": "nope", "stages": [{"layer": 1, "keep": 4}]}}
    with pytest.raises(ValueError, match=r"config 'x'.*Unknown scorer 'nope'"):
        parse_grid(grid(configs=[bad]))
    with pytest.raises(ValueError, match=r"Unknown scorer 'nope'"):
        parse_grid(grid(configs=[], sweep=[{"scorer": ["random", "nope"], "layers": [1], "keep": [4]}]))
    with pytest.raises(ValueError, match=r"config 'prune/random/L1/k4'.*bogus"):
        parse_grid(grid(configs=[], sweep=[{"scorer": ["random"], "layers": [1], "keep": [4],
                                             "scorer_options": {"random": {"bogus": 1}}}]))


def test_unknown_metric(tmp_path):
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*exact_match"):
        build_task("jsonl", data=str(tmp_path / "x.jsonl"), metric="bleu")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "answer": "a", "metric": "rouge"}) + "\n")
    with pytest.raises(ValueError, match=rf"unknown metric 'rouge' \(row 1 of {path}\)"):
        build_task("jsonl", data=str(path)).items()


def test_unknown_task_option():
    with pytest.raises(ValueError, match=r"task 'pope' has no option 'normalisation'"):
        build_task("pope", data="x", normalisation="llava")


def test_missing_data_path(tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(FileNotFoundError, match=rf"task 'pope': data path {missing} does not exist"):
        build_task("pope", data=str(missing)).items()
    with pytest.raises(ValueError, match=r"task 'gqa' needs a data path"):
        build_task("gqa").items()


def test_missing_columns(tmp_path):
    import datasets

    path = tmp_path / "pope.parquet"
    rows = [{"question_id": 1, "question": "is there a dog?", "label": "yes"}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"task 'pope': .*pope.parquet lacks the column\(s\) answer, image, category"):
        build_task("pope", data=str(path)).items()


def test_cli_names_the_error_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid(tasks=[{"name": "pope", "data": str(tmp_path / "none.parquet")}])))
    db = tmp_path / "r.sqlite"
    assert main(["study", "run", str(path), "--db", str(db), "--no-progress"]) == 2
    assert "none.parquet does not exist" in capsys.readouterr().err
    assert not db.exists()
    assert main(["study", "run", str(tmp_path / "nogrid.yaml"), "--db", str(db)]) == 2
    assert "no grid file" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(grid()))
    assert main(["study", "run", str(path), "--db", str(db), "--data", "pope=x.parquet"]) == 2
    assert "the grid has no task 'pope'" in capsys.readouterr().err


def test_unknown_grid_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) sweeps"):
        parse_grid(grid(sweeps=[]))


def test_layer_outside_the_model(tmp_path):
    deep = {"name": "deep", "config": {"action": "prune", "scorer": "random", "stages": [{"layer": 12, "keep": 4}]}}
    db = tmp_path / "r.sqlite"
    with pytest.raises(ValueError, match=r"config 'deep': .*layer.* 12"):
        run_grid(parse_grid(grid(configs=[deep])), db, progress=False)
    assert not db.exists()
    with pytest.raises(ValueError, match=r"relative stage layer must lie in \[0, 1\)"):
        run_grid(parse_grid(grid(configs=[], sweep=[{"scorer": "random", "layers": [1.5], "keep": [4]}])), db,
                 progress=False)


def test_database_of_another_grid_version_is_refused(tmp_path):
    db = tmp_path / "r.sqlite"
    run_grid(parse_grid(grid()), db, progress=False)
    con = sqlite3.connect(db)
    before = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    con.close()
    with pytest.raises(ValueError, match=r"holds results of another grid \(grid 'bad' version 1.*version 2"):
        run_grid(parse_grid(grid(version=2)), db, progress=False)
    changed = {"name": "fastv", "config": {**CONFIG["config"], "stages": [{"layer": 3, "keep": 16}]}}
    with pytest.raises(ValueError, match=r"config 'fastv' on task 'testbed' differs"):
        run_grid(parse_grid(grid(configs=[changed])), db, progress=False)
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == before == 12
    con.close()
    # a larger limit adds items to the same runs
    run_grid(parse_grid(grid(tasks=[{"name": "testbed", "limit": 6}])), db, progress=False)
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 18
    con.close()


def test_shipped_grid_by_name():
    g = load_grid("where-to-prune")
    scorers = {c.routing["scorer"] for c in g.configs}
    assert scorers == {"last_token_attention", "text_attention", "vision_cls_attention", "embedding_similarity",
                       "hidden_similarity", "duplication", "diversity", "random", "uniform", "oracle"}
    assert {c.routing["stages"][0]["keep"] for c in g.configs} == {0.25, 0.111, 0.0556}


def test_task_registry_refuses_a_taken_name():
    from visroute.evaluation.tasks import Task, get_task_class, register_task

    class Other(Task):
        name = "pope"

    with pytest.raises(ValueError, match="A task named 'pope' is already registered .*PopeTask"):
        register_task(Other)
    assert get_task_class("pope").__name__ == "PopeTask"


def test_a_file_that_is_no_results_database(tmp_path, capsys):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("not a database at all, just text that is long enough to have a header" * 20)
    assert main(["study", "list", "--db", str(bogus)]) == 2
    assert "is not a visroute results database" in capsys.readouterr().err
    assert main(["study", "report", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "no results database at" in capsys.readouterr().err

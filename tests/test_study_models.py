"""Grids over several models (`models:`, one results database each under a study index), and what
`study report` says about a grid's declared primary contrasts, the information horizon (interval criterion) and
chance-corrected accuracy, against hand-computed values and synthetic results with a known horizon."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml

from visroute.cli import main
from visroute.evaluation.grid import Contrast, load_grid, model_label, parse_grid
from visroute.evaluation.layout import databases, model_db, primary_contrasts, record_primary
from visroute.evaluation.report import write_report
from visroute.evaluation.store import Row, Store

SPEC = {"task": "testbed", "options": {}}


# ---- the grid --------------------------------------------------------------------------------------------------
def test_models_share_the_model_settings_and_override_them():
    grid = parse_grid({"tasks": ["testbed"], "model": {"dtype": "bfloat16", "batch_size": 8},
                       "models": ["testbed", {"path": "hub-org/some-model-7b", "batch_size": 4},
                                  {"path": "./ckpt/run-3/", "label": "mine"}]})
    assert [m.label for m in grid.models] == ["testbed", "some-model-7b", "mine"]
    assert [m.batch_size for m in grid.models] == [8, 4, 8] and {m.dtype for m in grid.models} == {"bfloat16"}
    assert grid.model is grid.models[0] and grid.multi_model
    one = grid.for_model(grid.models[1])
    assert one.identity() == {"grid": grid.name, "version": 1, "model": grid.models[1].fingerprint()}
    assert not one.multi_model and not parse_grid({"tasks": ["testbed"]}).multi_model
    assert model_label("/data/models/m1/") == "m1" and model_label("a b:c") == "a_b_c"


@pytest.mark.parametrize("bad, message", [
    ({"models": []}, "non-empty list"),
    ({"models": "testbed"}, "non-empty list"),
    ({"model": {"path": "testbed"}, "models": ["x"]}, "no path or label"),
    ({"models": ["org/m", "other/m"]}, "labels must differ"),
    ({"models": [{"dtype": "float32"}]}, "give a path"),
    ({"models": [{"path": "m", "dtype": "fp8"}]}, "models entry 1: dtype"),
    ({"models": [{"path": "m", "size": 3}]}, "unknown key(s) size"),
])
def test_bad_models_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_grid({"tasks": ["testbed"], **bad})


def test_each_model_has_a_database_named_after_the_study():
    assert model_db("out/study.sqlite", "m") == Path("out/study.m.sqlite")
    assert model_db("study", "m") == Path("study.m")


# ---- the report on synthetic results -----------------------------------------------------------------------------
def _add(store, name, kind, correct, config=None, family="existence"):
    run = store.run(name, kind, "testbed", "t", SPEC, config, name, "m", {}, {})
    store.add(run.run_id, [Row(i, "yes" if c else "no", bool(c), {"family": family, "correct": bool(c)})
                           for i, c in correct.items()])


def _stage(scorer, layer, seed=None):
    opts = {} if seed is None else {"seed": seed}
    return {"action": "prune", "scorer": scorer, "stages": [{"layer": layer, "keep": 2}], "scorer_options": opts}


def _horizon_db(path, horizon, seeds=5, n=120, layers=(0, 2, 4, 6)):
    """Signal `good` right on every item before `horizon`; random (each seed) right on half the items there;
    from `horizon` on, every run answers exactly as random: the known horizon by the interval criterion."""
    store = Store(path, {"grid": "g", "version": 1, "model": {"path": "m", "dtype": "float32"}})
    ids = [f"{i:03d}" for i in range(n)]
    rng = np.random.default_rng(0)
    _add(store, "unrouted", "unrouted", {i: True for i in ids})
    _add(store, "blind", "blind", {i: False for i in ids})  # every item vision-required
    for layer in layers:
        half = {i: bool(rng.random() < 0.5) for i in ids}
        for s in range(seeds):
            name = f"prune/{'random' if s == 0 else f'random-s{s}'}/L{layer}/k2"
            _add(store, name, "routed", half, _stage("random", layer, s))
        _add(store, f"prune/good/L{layer}/k2", "routed", {i: True for i in ids} if layer < horizon else half,
             _stage("good", layer))
        _add(store, f"prune/bad/L{layer}/k2", "routed", half, _stage("bad", layer))
    store.close()


def _line(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_report_horizon_by_the_interval_criterion_finds_a_known_horizon(tmp_path):
    _horizon_db(tmp_path / "r.sqlite", horizon=4)
    text = write_report(tmp_path / "r.sqlite", tmp_path / "out").read_text()
    assert "## Information horizon by an interval criterion (testbed)" in text
    row = _line(text, "| k2 | all |")
    # at layer 4 every run answers alike: best - random = 0 with the interval [0, 0], below delta 0.05
    assert "layer 4 (" in row and "+0.000 [+0.000, +0.000]" in row
    assert "within 2 points" not in text and "Information horizon (first stage layer" not in text
    assert "every comparison in this report is exploratory" in text  # no primary contrasts declared


def test_report_horizon_needs_random_at_five_seeds(tmp_path):
    _horizon_db(tmp_path / "r.sqlite", horizon=4, seeds=3)
    text = write_report(tmp_path / "r.sqlite", tmp_path / "out").read_text()
    assert "needs random at 5 seeds (has 3)" in _line(text, "| k2 | all |")


def test_report_tests_the_recorded_primary_contrasts_with_holm(tmp_path):
    db = tmp_path / "r.sqlite"
    store = Store(db, {"grid": "g", "version": 1, "model": {"path": "m", "dtype": "float32"}})
    ids = [str(i) for i in range(6)]
    _add(store, "unrouted", "unrouted", dict.fromkeys(ids, True))
    _add(store, "blind", "blind", dict(zip(ids, [0, 0, 0, 0, 0, 1])))  # item 5 blind-solvable
    _add(store, "a", "routed", dict(zip(ids, [1, 1, 1, 0, 1, 1])), _stage("a", 1))
    _add(store, "b", "routed", dict(zip(ids, [0, 0, 0, 0, 1, 0])), _stage("b", 1))
    _add(store, "c", "routed", dict(zip(ids, [0, 1, 0, 0, 1, 1])), _stage("c", 1))
    record_primary(store, [Contrast("a", "b"), Contrast("c", "b", "all")])
    store.close()
    assert primary_contrasts(db) == [Contrast("a", "b"), Contrast("c", "b", "all")]
    text = write_report(db, tmp_path / "out").read_text()
    assert "## Primary contrasts (declared in the grid, Holm-corrected)" in text
    # a - b on the vision-required items 0-4: d = [1, 1, 1, 0, 0]: mean 3/5; three equal non-zero differences:
    # exact sign-flip p = 2 / 2^3 = 0.25
    first = _line(text, "| testbed | a - b | vision_required |").split(" | ")
    assert first[3].startswith("+0.600") and first[4:6] == ["5", "0.2500"]
    # c - b on all items: d = [0, 1, 0, 0, 0, 1]: mean 2/6, p = 2 / 2^2 = 0.5
    second = _line(text, "| testbed | c - b | all |").split(" | ")
    assert second[3].startswith("+0.333") and second[4:6] == ["6", "0.5000"]
    # Holm over the two, by hand: 2 x 0.25 = 0.5; then max(0.5, 1 x 0.5) = 0.5
    assert first[6] == "0.5000 |" and second[6] == "0.5000 |"
    assert "Comparisons between configs here are exploratory" in _line(text, "Model `m`")
    # a grid given to `study report` replaces the recorded declaration (a database run before it was recorded)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "tasks": ["testbed"], "primary": [["c", "b"]], "configs": [
        {"name": n, "config": _stage("random", 1)} for n in "abc"]}))
    assert main(["study", "report", "--db", str(db), "--out", str(tmp_path / "g"), "--grid", str(grid)]) == 0
    text = (tmp_path / "g" / "report.md").read_text()
    assert "| testbed | c - b | vision_required |" in text and "| testbed | a - b |" not in text


def test_report_gives_chance_corrected_accuracy_beside_vision_required(tmp_path):
    db = tmp_path / "r.sqlite"
    store = Store(db, {"grid": "g", "version": 1, "model": {"path": "m", "dtype": "float32"}})
    fam = {"0": "existence", "1": "existence", "2": "existence", "3": "existence", "4": "counting",
           "5": "counting", "6": "blind_solvable"}
    for name, kind, correct in (("unrouted", "unrouted", [1, 1, 1, 1, 1, 1, 1]),
                                ("blind", "blind", [0, 0, 0, 0, 0, 0, 1]),
                                ("a", "routed", [1, 1, 1, 0, 1, 0, 1])):
        run = store.run(name, kind, "testbed", "t", SPEC, None if kind != "routed" else _stage("a", 1), name, "m",
                        {}, {})
        store.add(run.run_id, [Row(i, "x", bool(c), {"family": fam[i], "correct": bool(c)})
                               for i, c in zip(fam, correct)])
    store.close()
    text = write_report(db, tmp_path / "out").read_text()
    # existence: acc 3/4, chance 1/2 -> 0.5; counting: acc 1/2, chance 1/4 -> 1/3; equal weights -> 0.41667;
    # the blind-solvable family left out by its label. Vision-required: items 0-5, 4 of 6 right.
    assert "| a | 0.417 | 0.667 |" in text.splitlines()


# ---- several models, end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The shipped testbed model and `testbed-mute`, a copy whose output head is zeroed (every answer the same
    token), as named testbed models in a models folder."""
    import torch

    from visroute.testbed import MODELS_ENV, load_model

    root = tmp_path_factory.mktemp("models")
    model, processor = load_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(root / "testbed-mute")
    processor.save_pretrained(root / "testbed-mute")
    mp = pytest.MonkeyPatch()
    mp.setenv(MODELS_ENV, str(root))
    yield root
    mp.undo()


def _grid(path, models, version=1):
    path.write_text(yaml.safe_dump({
        "name": "two", "version": version, "model": {"batch_size": 4}, "models": models,
        "tasks": [{"name": "testbed", "limit": 4}],
        "sweep": [{"action": "prune", "scorer": ["text_attention", "random"], "layers": [2], "keep": [0.1]}],
        "primary": [{"a": "prune/text_attention/L2/k0.1", "b": "prune/random/L2/k0.1", "items": "all"}]}))
    return path


def _predictions(db, name):
    con = sqlite3.connect(db)
    out = dict(con.execute("SELECT item_id, prediction FROM results JOIN runs USING (run_id) WHERE name = ?",
                           (name,)))
    con.close()
    return out


def test_a_grid_over_two_models_runs_lists_reports_and_resumes(two_models, tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", ["testbed", "testbed-mute"])
    db = tmp_path / "study.sqlite"
    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress"]) == 0
    dbs = databases(db)
    assert dbs == {"testbed": tmp_path / "study.testbed.sqlite", "testbed-mute": tmp_path / "study.testbed-mute.sqlite"}
    for label, path in dbs.items():  # each bound exactly as a single-model run of that model
        one = load_grid(grid)
        one = one.for_model(next(m for m in one.models if m.label == label))
        Store(path, one.identity()).close()
        assert len(primary_contrasts(path)) == 1
        con = sqlite3.connect(path)
        assert con.execute("SELECT COUNT(DISTINCT run_id), COUNT(*) FROM results").fetchone() == (4, 16)
        con.close()
    base, mute = _predictions(dbs["testbed"], "unrouted"), _predictions(dbs["testbed-mute"], "unrouted")
    assert len(set(mute.values())) == 1 and mute != base  # the second model is the one that ran there
    capsys.readouterr()
    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress"]) == 0  # resumed: nothing left
    assert capsys.readouterr().out.count("(0 new from this process)") == 2

    assert main(["study", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "models 'testbed', 'testbed-mute'" in out and f"{dbs['testbed-mute']}: grid 'two'" in out
    assert "primary contrasts: prune/text_attention/L2/k0.1 - prune/random/L2/k0.1 (all)" in out

    assert main(["study", "report", "--db", str(db), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "# Model `testbed`" in text and "# Model `testbed-mute`" in text and "# Across models" in text
    assert (tmp_path / "report" / "testbed-mute_testbed_pareto.png").is_file()
    # the pooled contrast, by hand: the mean over the two models of each one's mean difference on all items
    diffs = []
    for path in dbs.values():
        a = _correct(path, "prune/text_attention/L2/k0.1")
        b = _correct(path, "prune/random/L2/k0.1")
        diffs.append(np.mean([a[i] - b[i] for i in a]))
    row = _line(text, "| testbed | prune/text_attention/L2/k0.1 - prune/random/L2/k0.1 | all |").split(" | ")
    assert row[3].startswith(f"{np.mean(diffs):+.3f}")
    assert row[4].startswith(f"{diffs[0]:+.3f}") and row[5].startswith(f"{diffs[1]:+.3f}")

    # `study pooled` on the index reads every model's database and the contrasts recorded there: the same rows
    assert main(["study", "pooled", "--db", str(db), "--out", str(tmp_path / "pooled")]) == 0
    pooled = (tmp_path / "pooled" / "pooled.md").read_text()
    assert _line(pooled, "| testbed | prune/text_attention") == _line(text, "| testbed | prune/text_attention")

    # another list of models is another study: refused before anything runs, the databases untouched
    other = _grid(tmp_path / "other.yaml", ["testbed-mute", "testbed"])
    assert main(["study", "run", str(other), "--db", str(db), "--no-progress"]) == 2
    assert "another grid" in capsys.readouterr().err
    # one model of the list alone, into a database of its own, as `--model` does for any grid
    assert main(["study", "run", str(grid), "--model", "testbed-mute", "--db", str(tmp_path / "one.sqlite"),
                 "--no-progress"]) == 0
    assert _predictions(tmp_path / "one.sqlite", "unrouted") == mute


def _correct(db, name):
    con = sqlite3.connect(db)
    out = {i: float(c) for i, c in con.execute(
        "SELECT item_id, correct FROM results JOIN runs USING (run_id) WHERE name = ?", (name,))}
    con.close()
    return out


def test_a_missing_model_is_named_before_any_model_runs(tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", ["testbed", "./no-such-model"])
    assert main(["study", "run", str(grid), "--db", str(tmp_path / "study.sqlite"), "--no-progress"]) == 2
    assert "no-such-model: no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "grid.yaml"]  # neither the index nor a model's database

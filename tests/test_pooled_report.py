"""The report pooled across models (visroute.evaluation.pooled) on hand-made runs with hand-computed answers,
and end to end from two results databases."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from visroute.cli import main
from visroute.evaluation import parse_grid
from visroute.evaluation.grid import Contrast
from visroute.evaluation.pooled import (
    contrast_values,
    horizon_inputs,
    loyalty_table,
    pooled_sections,
    primary_table,
    write_pooled_report,
)
from visroute.evaluation.report import RunSummary
from visroute.evaluation.store import Row, Run, Store


def summary(name, kind, correct: dict[str, bool], predictions=None, config=None):
    run = Run(1, name, kind, "testbed", "h", {"task": "testbed"}, config, "c", "m")
    rows = {i: Row(i, (predictions or {}).get(i, "yes" if c else "no"), c, {"family": "existence"})
            for i, c in correct.items()}
    return RunSummary(run, rows, float(np.mean(list(correct.values()))), (0.0, 1.0))


def model(blind, a, b, a_pred=None, unrouted_pred=None):
    ids = [str(i) for i in range(len(a))]
    mk = lambda v: dict(zip(ids, map(bool, v)))
    return {"testbed": [summary("unrouted", "unrouted", mk([1] * len(a)), unrouted_pred),
                        summary("blind", "blind", mk(blind)),
                        summary("a", "routed", mk(a), a_pred), summary("b", "routed", mk(b))]}


def test_contrast_on_vision_required_items_and_holm_by_hand():
    # model m1: items 0-4, blind right on item 4; a - b on items 0-3: [1-0, 1-0, 1-0, 0-0] -> d = [1, 1, 1, 0]
    # model m2: items 0-3, blind wrong everywhere; d = [1, 0, 0, 0]
    models = {"m1": model([0, 0, 0, 0, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]),
              "m2": model([0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])}
    a, b = contrast_values(models["m1"]["testbed"], Contrast("a", "b"))
    assert (a, b) == ({"0": 1, "1": 1, "2": 1, "3": 0}, {"0": 0, "1": 0, "2": 0, "3": 0})
    assert list(contrast_values(models["m1"]["testbed"], Contrast("a", "b", "all"))[0].values()) == [1, 1, 1, 0, 0]
    rows = primary_table(models, [Contrast("a", "b"), Contrast("b", "a", "all")], samples=200)
    first, second = rows
    assert first["pooled"].pooled.value == pytest.approx((3 / 4 + 1 / 4) / 2)
    # sign-flip, models weighed equally, an item flipping for both models (crossed): item 0 carries 1/8 + 1/8,
    # items 1 and 2 1/8 each (item 3 none): |observed| = 1/2 only when all three signs agree, 2 of 8
    assert first["p"] == pytest.approx(2 / 8)
    # b - a on all items: m1 d = [-1, -1, -1, 0, +1] weighed 1/10, m2 d = [-1, 0, 0, 0] weighed 1/8: items carry
    # -0.225, -0.1, -0.1, 0, +0.1; |observed| = 0.325. With k the sum of the three 0.1-signs: k = +-3 (1 vector
    # each) reaches 0.525 with one sign of item 0, k = +-1 (3 vectors each) reaches 0.325 with one: 8 of 16
    assert second["p"] == pytest.approx(8 / 16)
    # Holm over the two: 2 * 0.25 = 0.5, then max(0.5, 1 * 0.5)
    assert [r["p_holm"] for r in rows] == pytest.approx([0.5, 0.5])
    assert not first["pooled"].model_specific


def test_model_specific_flag_and_loyalty_by_hand():
    ids = ["0", "1", "2", "3"]
    m1 = model([0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], a_pred=dict(zip(ids, ["yes", "Yes.", "no", "no"])),
               unrouted_pred=dict(zip(ids, ["yes", "yes", "yes", "yes"])))
    m2 = model([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], a_pred=dict(zip(ids, ["yes"] * 4)),
               unrouted_pred=dict(zip(ids, ["yes"] * 4)))
    models = {"m1": m1, "m2": m2}
    (row,) = primary_table(models, [Contrast("a", "b")], samples=200)
    assert row["pooled"].model_specific  # +0.75 on m1, -0.5 on m2
    loyal = loyalty_table(models, "testbed", samples=200)
    assert loyal["a"].per_model["m1"].value == 0.5  # "yes", "Yes." agree; two "no" do not
    assert loyal["a"].per_model["m2"].value == 1.0
    assert loyal["a"].pooled.value == pytest.approx(0.75)
    text = "\n".join(pooled_sections(models, [Contrast("a", "b")], samples=200))
    assert "model-specific" in text and "## Loyalty (testbed)" in text


def test_horizon_inputs_collect_random_seeds():
    def run(name, scorer, layer, correct):
        cfg = {"action": "prune", "scorer": scorer, "stages": [{"layer": layer, "keep": 2}]}
        return summary(name, "routed", correct, config=cfg)

    runs = [run("prune/random/L1/k2", "random", 1, {"x": True, "y": False}),
            run("prune/random-s1/L1/k2", "random", 1, {"x": False, "y": False}),
            run("prune/last_token_attention/L1/k2", "last_token_attention", 1, {"x": True, "y": True}),
            run("prune/uniform/L1/k2", "uniform", 1, {"x": True, "y": True}),
            run("fastv@2", "last_token_attention", 1, {"x": True, "y": True})]
    empty = run("prune/last_token_attention/L3/k2", "last_token_attention", 3, {"x": False, "y": False})
    empty.run.config["stages"][0]["keep"] = 0  # keeps nothing: no selection to compare
    runs.append(empty)
    signals, random = horizon_inputs(runs, ids={"x"})["k2"]
    assert signals == {"last_token_attention": {1: {"x": 1.0}}}  # controls and listed configs left out
    assert random == {1: [{"x": 1.0}, {"x": 0.0}]}


def test_pooled_report_from_two_databases(tmp_path):
    dbs = []
    for m, flips in (("m1", [1, 1, 0, 1, 1, 1]), ("m2", [0, 1, 1, 1, 0, 1])):
        db = tmp_path / f"{m}.sqlite"
        store = Store(db, {"grid": "g", "version": 1, "model": {"path": m}})
        spec = {"task": "testbed", "options": {}}
        for name, kind, correct in (("unrouted", "unrouted", [1] * 6), ("blind", "blind", [0] * 6),
                                    ("a", "routed", flips), ("b", "routed", [0] * 6)):
            run = store.run(name, kind, "testbed", "t", spec, None if kind != "routed" else {"n": name},
                            name, m, {}, {})
            store.add(run.run_id, [Row(str(i), "yes" if c else "no", bool(c),
                                       {"family": "existence", "correct": bool(c)}) for i, c in enumerate(correct)])
        store.close()
        dbs.append(db)
    grid = parse_grid({"name": "g", "tasks": ["testbed"],
                       "configs": [{"name": "a", "method": "fastv@64"}, {"name": "b", "method": "pdrop@64"}],
                       "primary": [{"a": "a", "b": "b"}]})
    path = write_pooled_report(dbs, tmp_path / "out", grid.primary)
    text = path.read_text()
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "g", "tasks": ["testbed"], "primary": [["a", "b"]], "configs": [
        {"name": "a", "method": "fastv@64"}, {"name": "b", "method": "pdrop@64"}]}))
    assert main(["study", "pooled", "--db", str(dbs[0]), "--db", str(dbs[1]), "--grid", str(grid_file),
                 "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "pooled.md").read_text() == text
    assert "`m1`, `m2`" in text
    line = next(l for l in text.splitlines() if l.startswith("| testbed | a - b |"))
    # m1: 5 of 6 right against none, m2: 4 of 6: pooled (5/6 + 4/6) / 2
    assert line.split(" | ")[3].startswith("+0.750") and "+0.833" in line and "+0.667" in line


def test_the_report_table_has_a_loyalty_column():
    from visroute.evaluation.report import _table

    ids = ["0", "1", "2", "3"]
    runs = model([0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], a_pred=dict(zip(ids, ["yes", "Yes.", "no", "no"])),
                  unrouted_pred=dict(zip(ids, ["yes"] * 4)))["testbed"]
    lines = _table(runs, 4)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    col = head.index("loyalty [95% CI]")
    cells = {l.split("|")[1].strip(): l.strip("|").split("|")[col].strip() for l in lines[2:]}
    # a: 2 of 4 agree; Wilson by hand: centre (0.5 + 0.48018) / 1.96037 = 0.5, half 1.95996 * sqrt(0.0625 +
    # 0.06002) / 1.96037 = 0.34990
    assert cells["a"] == "0.500 [0.150, 0.850]"
    assert cells["unrouted"] == "-" and cells["blind"] == "-"


def test_signal_minus_random_by_hand_and_its_figure(tmp_path):
    from visroute.evaluation.pooled import plot_signal_minus_random, signal_minus_random

    def run(name, scorer, layer, correct, kind="routed"):
        cfg = {"action": "prune", "scorer": scorer, "stages": [{"layer": layer, "keep": 2}]}
        return summary(name, kind, correct, config=cfg if kind == "routed" else None)

    def runs(signal, r0, r1, blind):
        return {"testbed": [run("unrouted", None, 0, {"x": True, "y": True, "z": True}, "unrouted"),
                            run("blind", None, 0, blind, "blind"),
                            run("prune/diversity/L2/k2", "diversity", 2, signal),
                            run("prune/random/L2/k2", "random", 2, r0),
                            run("prune/random-s1/L2/k2", "random", 2, r1),
                            run("prune/oracle/L2/k2", "oracle", 2, signal)]}

    # m1: blind right on z, so x and y count: diversity 1, 1; random (1, 0) and (0, 0) -> 0.25; 1 - 0.25
    # m2: every item counts: diversity 1, 0, 0 -> 1/3; random (1, 1, 1) and (0, 0, 1) -> 2/3; 1/3 - 2/3
    models = {"m1": runs({"x": True, "y": True, "z": False}, {"x": True, "y": False, "z": True},
                         {"x": False, "y": False, "z": True}, {"x": False, "y": False, "z": True}),
              "m2": runs({"x": True, "y": False, "z": False}, {"x": True, "y": True, "z": True},
                         {"x": False, "y": False, "z": True}, {"x": False, "y": False, "z": False})}
    table = signal_minus_random(models, "testbed")
    assert set(table["k2"]) == {"diversity"}  # controls are not signals
    assert table["k2"]["diversity"][2] == pytest.approx({"m1": 0.75, "m2": 1 / 3 - 2 / 3})
    assert plot_signal_minus_random(models, "testbed", tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_pooled_report_draws_its_primary_contrasts(tmp_path):
    from visroute.evaluation.pooled import figure_sections

    models = {"m1": model([0, 0, 0, 0, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]),
              "m2": model([0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])}
    lines = figure_sections(models, tmp_path, [Contrast("a", "b")], samples=100)
    assert "![primary contrasts](testbed_primary.png)" in lines
    assert (tmp_path / "testbed_primary.png").stat().st_size > 0
    assert figure_sections(models, tmp_path / "none") == []  # no contrasts, no prune sweep: nothing to draw


def test_method_curves_by_hand_and_their_figure(tmp_path):
    from visroute.evaluation.pooled import method_curves, plot_methods_by_budget

    def run(name, vision_required, avg_T, kind="routed"):
        s = summary(name, kind, {"x": True})
        s.vision_required, s.avg_T = vision_required, avg_T
        return s

    def runs(nuwa48, nuwa32, r0, r1):
        return {"testbed": [run("unrouted", 0.9, 144.0, "unrouted"), run("blind", 0.0, 0.0, "blind"),
                            run("nuwa@48", nuwa48, 48.0), run("nuwa@32", nuwa32, 32.0), run("pdrop@48", 0.3, 48.0),
                            run("pdrop@48/random", 0.1, 48.0), run("reroute-fastv@48:scoring=previous", 0.9, 48.0),
                            run("no-such-method@48", 0.9, 48.0),
                            run("prune/random/L0/T48", r0, 48.0), run("prune/random-s1/L0/T48", r1, 48.0),
                            run("prune/pool/L0/T48", 0.1, 48.0)]}

    models = {"m1": runs(0.5, 0.4, 0.2, 0.4), "m2": runs(0.7, 0.6, 0.1, 0.1)}
    curves = method_curves(models, "testbed")
    assert set(curves) == {"nuwa", "pdrop", "random before the decoder", "pooling"}
    assert curves["nuwa"] == {48.0: {"m1": 0.5, "m2": 0.7}, 32.0: {"m1": 0.4, "m2": 0.6}}
    assert curves["random before the decoder"][48.0] == pytest.approx({"m1": 0.3, "m2": 0.1})
    assert curves["pooling"] == {48.0: {"m1": 0.1, "m2": 0.1}}
    assert plot_methods_by_budget(models, "testbed", tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    one = {m: {"testbed": [s for s in r["testbed"] if not s.name.startswith("pdrop")]} for m, r in models.items()}
    assert not plot_methods_by_budget(one, "testbed", tmp_path / "none.png")  # one method: nothing to compare

"""The study's analyses (visroute.evaluation.study) on hand-made rows with hand-computed answers, and end to end
on a small sweep over every decoder layer of the shipped testbed model."""

from __future__ import annotations

import numpy as np
import pytest

from visroute.evaluation.report import RunSummary
from visroute.evaluation.store import Row, Run, Store
from visroute.evaluation.study import matched_pairs, position_bias, reentry, signal_differences


def summary(name, config, rows):
    run = Run(1, name, "routed", "testbed", "h", {}, config, "c", "testbed")
    return RunSummary(run, {r.item_id: r for r in rows}, float(np.mean([r.correct for r in rows])), (0.0, 1.0))


def row(item, selected, relevant=None, grid=(2, 3), family="relation_attribute", correct=True):
    return Row(item, "x", correct, {"family": family}, routing={"selected": selected, "relevant": relevant,
                                                                 "grid": list(grid)})


def test_reentry_counts_tokens_left_out_that_come_back_and_which_hop_they_are():
    # 6 tokens; stage 0 keeps {0, 1}, stage 1 keeps {1, 2, 5}: of the 4 left out (2, 3, 4, 5), 2 and 5 come back.
    # hop 1 = {0}, hop 2 = {5}: one of the 2 re-entries is a hop-2 token; hop 2 is 1 of the 4 left out.
    r1 = row("a", [[0, 1], [1, 2, 5]], relevant=[[0], [5]])
    # a one-hop item: 3 left out ({3, 4, 5} of 6 after keeping {0, 1, 2}), none returns; not in the hop-2 counts
    r2 = row("b", [[0, 1, 2], [0, 1, 2]], relevant=[[1]], family="attribute")
    stats = reentry(summary("reroute-x", {"action": "reroute", "stages": [{}, {}]}, [r1, r2]))
    assert stats["rate"] == pytest.approx(2 / 7)
    assert stats["reentered"] == 2
    assert stats["hop2"] == pytest.approx(1 / 2)
    assert stats["hop2_base"] == pytest.approx(1 / 4)
    assert reentry(summary("one", {"action": "reroute", "stages": [{}]}, [row("c", [[0]])])) is None


def test_position_bias_is_the_selection_rate_per_row_and_column_relative_to_uniform():
    config = {"action": "prune", "scorer": "s", "stages": [{"layer": 1, "keep": 2}]}
    # a 2 x 3 grid (tokens 0 1 2 / 3 4 5); both items select tokens of the bottom row only
    rows = [row("a", [[3, 4]]), row("b", [[4, 5]])]
    bias = position_bias([summary("prune/s/L1/k2", config, rows)])["s"]
    np.testing.assert_allclose(bias["rows"], [0.0, 2.0])  # all 4 picks in row 1: twice the uniform share
    np.testing.assert_allclose(bias["cols"], [0.75, 1.5, 0.75])  # picks by column 1, 2, 1 of 4; uniform 4/3
    listed = summary("fastv@16", config, rows)  # a listed (method) config is not pooled with the sweep
    assert position_bias([listed]) == {}


def test_signal_differences_pair_each_signal_with_random_on_the_vision_required_items():
    def run(name, kind, correct: dict[str, bool], layer=None):
        config = None if layer is None else {"action": "prune", "scorer": name.split("/")[1],
                                             "stages": [{"layer": layer, "keep": 2}]}
        s = summary(name, config, [row(i, [[0]], family="attribute", correct=c) for i, c in correct.items()])
        s.run.kind = kind
        return s

    # items a, b, c are vision-required (the blind control gets them wrong); d is not and must not count
    runs = [run("blind", "blind", {"a": False, "b": False, "c": False, "d": True})]
    s = {0: "1101", 1: "1001", 2: "1100", 3: "0110"}  # per layer: a b c d correct?
    rnd = {0: "0010", 1: "0001", 2: "1100", 3: "0110"}
    for layer in range(4):
        for name, table in (("s", s), ("random", rnd)):
            runs.append(run(f"prune/{name}/L{layer}/k2", "routed",
                            {i: v == "1" for i, v in zip("abcd", table[layer])}, layer))
    diffs = signal_differences(runs)["k2"]
    # early (layers 0, 1): s per item a 1, b 0.5, c 0 (mean 1/2); random a 0, b 0, c 0.5 (mean 1/6)
    n, d, lo, hi, first, last = diffs["early"]["s"]
    assert (n, first, last) == (3, 0, 1) and d == pytest.approx(1 / 3) and lo <= d <= hi
    n, d, lo, hi, first, last = diffs["late"]["s"]  # layers 2, 3: the same answers, no difference at all
    assert (n, first, last, d, lo, hi) == (3, 2, 3, 0.0, 0.0, 0.0)
    assert "random" not in diffs["early"]


def test_matched_pairs_join_a_reroute_variant_to_its_base():
    a, b, c = (summary(n, {"action": "prune"}, [row("a", [[0]])]) for n in ("pdrop@36", "reroute-pdrop@36", "nuwa@24"))
    assert [(x.name, y.name) for x, y in matched_pairs([a, b, c])] == [("reroute-pdrop@36", "pdrop@36")]


def test_a_sweep_over_every_layer_stores_the_routing_and_reports_the_study(tmp_path):
    from visroute.evaluation import parse_grid, run_grid, write_report

    grid = parse_grid({"name": "every", "version": 1, "model": {"path": "testbed", "batch_size": 9},
                       "tasks": [{"name": "testbed", "limit": 18}],
                       "sweep": [{"action": "prune", "scorer": ["random", "oracle"], "layers": "every", "keep": [8]}]})
    db = tmp_path / "every.sqlite"
    run_grid(grid, db, progress=False)
    store = Store(db)
    runs = {r.name: r for r in store.runs()}
    from visroute.testbed import load_model

    layers = load_model()[0].config.text_config.num_hidden_layers
    assert {f"prune/random/L{l}/k8" for l in range(layers)} <= set(runs)  # one config per decoder layer
    rows = store.rows(runs["prune/oracle/L1/k8"].run_id)
    store.close()
    for r in rows:
        (selected,) = r.routing["selected"]
        assert len(selected) == 8 and r.routing["grid"] == [12, 12]
        relevant = sorted({t for hop in r.routing["relevant"] for t in hop})
        if relevant and len(relevant) <= 8:  # the oracle keeps every relevant token when the budget allows
            assert set(relevant) <= set(selected)
    report = write_report(db, tmp_path / "report")
    text = report.read_text()
    assert "## Where to prune: one-hop families (testbed)" in text and "## Position bias" in text
    assert (tmp_path / "report" / "testbed_position_bias.png").exists()

"""A small sweep on the testbed: the blind control, vision-required accuracy and visual gain retained against
their definitions, and `study report` (report.md and the plots)."""

import sqlite3

import numpy as np
import pytest
import yaml

from visroute.cli import main
from visroute.evaluation.report import pareto_front, summarize
from visroute.evaluation.store import Store

N = 24


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    grid = {"name": "small", "model": {"path": "testbed", "batch_size": 12},
            "tasks": [{"name": "testbed", "limit": N}],
            "sweep": [{"action": "prune", "scorer": ["last_token_attention", "random", "oracle"], "layers": [0, 4],
                       "keep": [0.1]},
                      {"action": ["prune", "reroute"], "scorer": ["last_token_attention"], "layers": [[1, 3, 5]],
                       "keep": [0.1]}]}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    db = root / "results.sqlite"
    assert main(["study", "run", str(root / "grid.yaml"), "--db", str(db), "--no-progress"]) == 0
    return root, db


def _correct(db, name):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT item_id, correct, prediction FROM results JOIN runs USING (run_id) WHERE name = ?",
                       (name,)).fetchall()
    con.close()
    return {i: (bool(c), p) for i, c, p in rows}


def test_blind_pass_is_the_question_without_the_image(study):
    """The blind rows are what the model answers to the testbed's blind prompt (`USER: {question} ASSISTANT:`,
    no pixels), generated here directly, one question at a time."""
    import torch

    from visroute.testbed import DEFAULT_WORLD, HELDOUT_SEED, load_model, make_items
    from visroute.testbed.modeling import prompt

    _, db = study
    model, processor = load_model()
    expected = {}
    for it in make_items(N, HELDOUT_SEED, world=DEFAULT_WORLD):  # the testbed task's default world
        inputs = processor(text=[prompt(it.question, image=False)], return_tensors="pt")
        assert "pixel_values" not in inputs
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        text = " ".join(answer.split())
        correct = text == it.answer if it.box is None else None
        expected[it.id] = (correct, text)
    blind = _correct(db, "blind")
    assert {k: p for k, (_, p) in blind.items()} == {k: p for k, (_, p) in expected.items()}
    assert all(blind[k][0] == c for k, (c, _) in expected.items() if c is not None)


def test_blind_solvable_vision_required_and_gain_retained(study):
    _, db = study
    store = Store(db)
    summaries = {s.name: s for s in summarize(store)["testbed"]}
    store.close()
    blind, base = _correct(db, "blind"), _correct(db, "unrouted")
    solvable = {i for i, (c, _) in blind.items() if c}
    assert 0 < len(solvable) < N  # the testbed has blind-solvable questions, and not only those
    assert {i for i, r in summaries["blind"].rows.items() if r.correct} == solvable
    for name in ("unrouted", "prune/random/L0/k0.1", "prune/last_token_attention/L4/k0.1"):
        run = _correct(db, name)
        acc = np.mean([c for c, _ in run.values()])
        vra = np.mean([run[i][0] for i in run if i not in solvable])
        acc_b = len(solvable) / N
        acc_u = np.mean([c for c, _ in base.values()])
        s = summaries[name]
        assert s.accuracy == pytest.approx(acc) and s.vision_required == pytest.approx(vra)
        assert s.gain_retained == pytest.approx((acc - acc_b) / (acc_u - acc_b))
        assert s.ci[0] <= acc <= s.ci[1]
    assert summaries["unrouted"].gain_retained == pytest.approx(1.0)
    assert summaries["blind"].vision_required == 0.0


def test_costs_and_recall_per_row(study):
    _, db = study
    store = Store(db)
    s = {x.name: x for x in summarize(store)["testbed"]}
    store.close()
    assert s["unrouted"].avg_T == 144.0 and s["unrouted"].flops == pytest.approx(1.0) and s["blind"].avg_T == 0.0
    # one stage at layer 4 of 12 keeping 14 of 144 tokens: avg_T = (4 * 144 + 8 * 14) / 12
    assert s["prune/random/L4/k0.1"].avg_T == pytest.approx((4 * 144 + 8 * 14) / 12)
    assert 0 < s["prune/random/L4/k0.1"].flops < 1 and 0 < s["prune/random/L4/k0.1"].kv < 1
    # equal schedules, equal budgets: prune and reroute hold the same avg_T
    assert s["prune/last_token_attention/L1-3-5/k0.1"].avg_T == s["reroute/last_token_attention/L1-3-5/k0.1"].avg_T
    from visroute.testbed import DEFAULT_WORLD, HELDOUT_SEED, make_items

    rec = s["prune/oracle/L0/k0.1"].recall()
    assert len(rec) == 1 and rec[0][0] > s["prune/random/L0/k0.1"].recall()[0][0]
    # recall per hop: two-hop families (hop 2: the object found through the one the question names) add a hop
    assert len(rec[0]) == max(len(it.hops) for it in make_items(N, HELDOUT_SEED, world=DEFAULT_WORLD)) == 2


def test_report_writes_markdown_and_plots(study):
    root, db = study
    out = root / "report"
    assert main(["study", "report", "--db", str(db), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for png in ("testbed_accuracy_vs_layer.png", "testbed_pareto.png", "testbed_recall_vs_layer.png",
                "testbed_reroute_minus_prune.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in text
    assert "| prune/random/L4/k0.1 | 24 |" in text
    assert "reroute/last_token_attention/L1-3-5/k0.1 | prune/last_token_attention/L1-3-5/k0.1 | 24 |" in text
    assert "Information horizon" in text and "Blind-solvable:" in text


def test_pareto_front_on_fixed_points():
    assert pareto_front([(10, 0.5), (5, 0.6), (20, 0.55), (20, 0.7), (1, 0.1)]) == [(1, 0.1), (5, 0.6), (20, 0.7)]

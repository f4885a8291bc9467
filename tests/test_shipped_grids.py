"""Every grid shipped in `visroute/grids` runs end to end on a small limit, and its report is written.

The testbed grids run as shipped on the shipped checkpoint. The real-checkpoint grid (LLaVA-1.5-7B on a GPU and
benchmark files) runs with its model replaced by a tiny random-weight LLaVA-1.5 with the real model's 576 visual
tokens and its 32 decoder layers (the papers' tiers need the depth: SparseVLM's and DART's stage at layer 2
reaches avg_T 64 only on 18 or more), on the CPU, and its data paths by tiny files in each benchmark's public
layout: every task, sweep entry and method of the shipped file is resolved and run."""

import json
import sqlite3

import pytest

from test_evaluation_tasks import write_layouts
from visroute.cli import main
from visroute.evaluation import load_grid
from visroute.evaluation.grid import shipped_grids
from visroute.evaluation.layout import databases
from visroute.testbed import load_model

TESTBED_GRIDS = ("where-to-prune", "study-where-to-prune", "study-reroute", "study-methods")


def _runs(db) -> dict[str, int]:
    con = sqlite3.connect(db)
    out = dict(con.execute("SELECT runs.name, COUNT(*) FROM results JOIN runs USING (run_id) GROUP BY runs.name"))
    con.close()
    return out


def _expected_runs(grid) -> int:
    """unrouted + blind + every config, with `layers: every` expanded over the testbed decoder's depth."""
    layers = load_model()[0].config.text_config.num_hidden_layers
    return sum(len(c.expand(layers)) for c in grid.configs) + 2


def test_every_shipped_grid_is_tested():
    assert set(shipped_grids()) == set(TESTBED_GRIDS) | {"study-real"}


@pytest.mark.parametrize("name", TESTBED_GRIDS)
def test_testbed_grid_runs_and_reports(name, tmp_path):
    """Each model of the grid gets every run on every item, in its own database; the report covers them."""
    db = tmp_path / "results.sqlite"
    grid = load_grid(name)
    assert main(["study", "run", name, "--db", str(db), "--limit", "2", "--no-progress"]) == 0
    dbs = databases(db)
    assert sorted(dbs) == sorted(m.label for m in grid.models)
    for model_db in dbs.values():
        runs = _runs(model_db)
        assert len(runs) == _expected_runs(grid)
        assert set(runs.values()) == {2}  # every run answered every item
    assert main(["study", "report", "--db", str(db), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    if name == "study-reroute":
        assert "reroute-pdrop@36" in text and "pdrop@36" in text
    if name == "study-methods":
        assert "cdpruner@32" in text and "prune/pool/L0/T48" in text and "nuwa@48/random" in text
    if grid.primary:
        assert "Holm" in text


def test_real_checkpoint_grid_runs_on_files_in_the_public_layouts(tmp_path):
    from tiny import tiny_llava, tiny_llava_processor

    model = tiny_llava(layers=32, image_size=96, patch=4)  # 24 x 24 = 576 visual tokens and 32 layers, as LLaVA-1.5
    # random weights never say </s>: make every token end the answer, so each of the ~1,000 runs decodes one token
    # (the grid's routing acts on the prefill; the answers of a random model are not what is tested)
    model.generation_config.eos_token_id = list(range(model.config.text_config.vocab_size))
    model.save_pretrained(tmp_path / "model")
    tiny_llava_processor(model).save_pretrained(tmp_path / "model")
    tasks = write_layouts(tmp_path)
    data = [f"pope={tasks['pope']['data']}", f"gqa={tasks['gqa']['data']['data']}",
            f"gqa.images={tasks['gqa']['data']['images']}", f"refcoco={tasks['refcoco']['data']}",
            f"datbench={tasks['datbench']['data']}"]
    db = tmp_path / "results.sqlite"
    args = ["study", "run", "study-real", "--db", str(db), "--model", str(tmp_path / "model"), "--device", "cpu",
            "--dtype", "float32", "--limit", "1", "--no-progress"]
    for d in data:
        args += ["--data", d]
    assert main(args) == 0
    grid = load_grid("study-real")
    con = sqlite3.connect(db)
    per_task = dict(con.execute("SELECT task, COUNT(DISTINCT run_id) FROM runs GROUP BY task"))
    con.close()
    # a config that computes what another one does on this model runs once, under the first name (e.g. DivPrune
    # at avg_T 192 is the diversity sweep's one stage at layer 0 keeping 192 tokens)
    resolved = {}
    for c in grid.configs:
        resolved.setdefault(json.dumps(c.resolve(32, 576, "llava").to_dict(), sort_keys=True), c)
    assert len(resolved) < len(grid.configs)
    # the oracle needs each item's relevant tokens: it runs on the box tasks only (RefCOCO, DatBench grounding)
    oracle = sum(1 for c in resolved.values() if (c.routing or {}).get("scorer") == "oracle")
    assert per_task["refcoco"] == len(resolved) + 2
    assert per_task["pope"] == len(resolved) + 2 - oracle
    assert set(per_task) == {"pope", "gqa", "refcoco", "datbench"}
    assert main(["study", "report", "--db", str(db), "--out", str(tmp_path / "report")]) == 0

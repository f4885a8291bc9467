"""`accelerate launch` with 2 CPU processes gives the same rows as one process, each written once.

(`accelerate launch --cpu` starts several processes only through MPI; on a machine without GPUs
`--multi_gpu --num_processes 2` starts 2 CPU processes through torchrun, which is what is tested.)"""

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml

from visroute.cli import main


def _rows(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, item_id, prediction, correct, metrics_json, avg_T, kv_entries, recall_json "
                       "FROM results JOIN runs USING (run_id) ORDER BY name, item_id").fetchall()
    ranks = dict(con.execute("SELECT rank, COUNT(*) FROM results GROUP BY rank").fetchall())
    con.close()
    return rows, ranks


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate's launcher is not installed")
def test_two_processes_give_the_rows_of_one(tmp_path):
    grid = {"name": "parallel", "model": {"path": "testbed", "batch_size": 4},
            "tasks": [{"name": "testbed", "limit": 18}],
            "configs": [{"name": "fastv", "config": {"action": "prune", "scorer": "last_token_attention",
                                                       "stages": [{"layer": 2, "keep": 16}]}},
                        {"name": "oracle", "config": {"action": "reroute", "scorer": "oracle", "stages": [
                            {"layer": 1, "keep": 16}, {"layer": 4, "keep": 8}]}}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    par = tmp_path / "parallel.sqlite"
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                           "-m", "visroute", "study", "run", str(path), "--db", str(par), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one.sqlite"
    assert main(["study", "run", str(path), "--db", str(one), "--no-progress"]) == 0
    rows_par, ranks = _rows(par)
    rows_one, _ = _rows(one)
    assert ranks == {0: 36, 1: 36}  # 18 items x 4 runs, split between the processes
    assert rows_par == rows_one

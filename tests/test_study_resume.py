"""A sweep whose process is killed (SIGKILL) mid-run and then resumed holds every row exactly once, with the
same values as an uninterrupted run."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import yaml

from visroute.cli import main

N, CONFIGS = 40, 3  # unrouted, blind, one routed config


def _grid(path):
    grid = {"name": "resume", "model": {"path": "testbed", "batch_size": 4}, "tasks": [{"name": "testbed", "limit": N}],
            "configs": [{"name": "fastv", "config": {"action": "prune", "scorer": "last_token_attention",
                                                       "stages": [{"layer": 2, "keep": 16}]}}]}
    path.write_text(yaml.safe_dump(grid))
    return path


def _count(db) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=5)
        n = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        con.close()
        return n
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _rows(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, item_id, prediction, correct, avg_T, kv_entries, recall_json FROM results "
                       "JOIN runs USING (run_id) ORDER BY name, item_id").fetchall()
    con.close()
    return rows


def test_sigkill_then_resume_holds_every_row_once(tmp_path):
    grid, db = _grid(tmp_path / "grid.yaml"), tmp_path / "killed.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visroute", "study", "run", str(grid), "--db", str(db),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(db) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count(db)
    assert proc.returncode == -signal.SIGKILL and 12 <= partial < N * CONFIGS  # killed mid-run
    assert partial % 4 == 0  # whole batches only: one transaction per batch of 4

    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress"]) == 0
    rows = _rows(db)
    assert len(rows) == N * CONFIGS and len({(r[0], r[1]) for r in rows}) == len(rows)

    fresh = tmp_path / "fresh.sqlite"
    assert main(["study", "run", str(grid), "--db", str(fresh), "--no-progress"]) == 0
    assert _rows(fresh) == rows
    # a third run finds nothing to do
    assert main(["study", "run", str(grid), "--db", str(db), "--no-progress"]) == 0
    assert _rows(db) == rows

"""The results database (SQLite).

Tables:
  meta    key -> value: the schema version and the identity of the grid that wrote the database (its name,
          version and model); a database written by another grid identity is refused, never mixed. Notes
          (`note:<key>`, JSON) record what is not part of the identity, e.g. the grid's primary contrasts.
  runs    one row per (config, task): the config (JSON) and its hash, the kind (unrouted / blind / routed), the
          task and its hash (name, data, options), the model, package versions and hardware.
  results one row per (run, item): prediction, correctness, the task's metric values (JSON), avg_T, K/V
          entries (routed and unrouted), decoder prefill FLOPs (routed and unrouted), retention recall per
          stage and hop (JSON), the routing itself (JSON: each stage's selected visual tokens, the item's
          relevant tokens per hop and its token grid, for the analyses of position bias and re-entry),
          seconds, the process rank that wrote it.
  tasks   task -> the number of items it was asked to run (after the limit; the largest asked): a run with
          fewer rows (plus skipped items) is partial.
  skipped one row per (task, item) that could not be run (an unreadable image, a row without question or
          answer), with the reason; never scored, and retried when the sweep is resumed.
  claims  (run, item) -> the process computing it now ("host:pid"), so that two sweeps on one database share
          the work instead of both computing it; a claim of a process that is gone (or older than
          CLAIM_SECONDS, for another host) is taken over.

Writes go through one transaction per batch in WAL mode, and (run, item) is the primary key: a process killed at
any moment leaves whole batches only, and a resumed or parallel sweep can neither lose nor duplicate a row: each
batch is claimed before it is computed, and a row another process stored first is kept, the new one dropped
(INSERT OR IGNORE), so two sweeps on one database share the work and both finish with every row once."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 2
CLAIM_SECONDS = 3600.0  # a claim of a process on another host counts this long (its liveness cannot be checked)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    task TEXT NOT NULL,
    task_hash TEXT NOT NULL,
    task_json TEXT NOT NULL,
    config_json TEXT,
    config_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    hardware_json TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (task, name)
);
CREATE TABLE IF NOT EXISTS results (
    run_id INTEGER NOT NULL REFERENCES runs (run_id),
    item_id TEXT NOT NULL,
    prediction TEXT NOT NULL,
    correct INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    avg_T REAL,
    kv_entries INTEGER,
    kv_unrouted INTEGER,
    flops REAL,
    flops_unrouted REAL,
    recall_json TEXT,
    routing_json TEXT,
    seconds REAL NOT NULL,
    rank INTEGER NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE TABLE IF NOT EXISTS tasks (task TEXT PRIMARY KEY, items INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS claims (
    run_id INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE TABLE IF NOT EXISTS skipped (
    task TEXT NOT NULL,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (task, item_id)
);
"""


@dataclass
class Run:
    run_id: int
    name: str
    kind: str
    task: str
    task_hash: str
    task_spec: dict[str, Any]
    config: dict[str, Any] | None
    config_hash: str
    model: str


@dataclass
class Row:
    """One (run, item) result."""

    item_id: str
    prediction: str
    correct: bool
    metrics: dict[str, Any]
    avg_T: float | None = None
    kv_entries: int | None = None
    kv_unrouted: int | None = None
    flops: float | None = None
    flops_unrouted: float | None = None
    recall: list[list[float | None]] | None = None  # [stage][hop]
    routing: dict[str, Any] | None = None  # {"selected": [stage][token], "relevant": [hop][token], "grid": [r, c]}
    seconds: float = 0.0
    rank: int = 0


class Store:
    """A results database. `Store(path, identity)` binds a new database to `identity` (a JSON-able dict) and
    refuses one bound to another; `Store(path)` opens an existing one to read."""

    def __init__(self, path: str | Path, identity: dict[str, Any] | None = None, timeout: float = 120.0):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"--db {self.path} is a folder; give a database file, e.g. {self.path / 'results.sqlite'}")
        if identity is None and not self.path.exists():
            raise FileNotFoundError(f"no results database at {self.path}")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--db {self.path}: no folder {self.path.parent}")
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:  # another program's database: leave it as it is
                raise ValueError(f"{self.path} is an SQLite database of something else (tables "
                                 f"{', '.join(sorted(tables))}), not a visroute results database; use another --db")
            _use_wal(self.conn, timeout)
            self.conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode a commit survives a killed process
            with self.transaction():
                for statement in _SCHEMA.split(";"):  # executescript would commit the open transaction
                    if statement.strip():
                        self.conn.execute(statement)
                self._bind(identity)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise ValueError(f"{self.path} is not a visroute results database ({e})") from None
        except ValueError:
            self.conn.close()
            raise

    # ---- binding -------------------------------------------------------------------------------------------
    def _bind(self, identity: dict[str, Any] | None) -> None:
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            if identity is None:
                raise ValueError(f"{self.path} is not a visroute results database")
            self.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", str(SCHEMA_VERSION)), ("identity", json.dumps(identity, sort_keys=True))])
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("schema", -1)) != SCHEMA_VERSION:
            raise ValueError(f"{self.path} has results schema {meta.get('schema')}; this visroute writes schema "
                             f"{SCHEMA_VERSION}. Use another --db")
        self.identity = json.loads(meta["identity"])
        if identity is not None and self.identity != json.loads(json.dumps(identity)):
            raise ValueError(
                f"{self.path} holds results of another grid ({_describe(self.identity)}), not of this one "
                f"({_describe(identity)}); results are never mixed: use another --db")

    def set_note(self, key: str, value: Any) -> None:
        """Record `value` (JSON-able) under `key`, replacing an earlier note."""
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"note:{key}", json.dumps(value)))

    def note(self, key: str) -> Any:
        """The note recorded under `key`, or None."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (f"note:{key}",)).fetchone()
        return None if row is None else json.loads(row[0])

    def transaction(self) -> "_Transaction":
        return _Transaction(self.conn)

    # ---- runs ----------------------------------------------------------------------------------------------
    def run(self, name: str, kind: str, task: str, task_hash: str, task_spec: dict, config: dict | None,
            config_hash: str, model: str, versions: dict, hardware: dict) -> Run:
        """The run of (task, name), created if new. A name whose config or task changed since it was run is
        refused (its old rows would be mixed with new ones)."""
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO runs (name, kind, task, task_hash, task_json, config_json, config_hash, model,"
                " versions_json, hardware_json, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind, task, task_hash, json.dumps(task_spec, sort_keys=True),
                 None if config is None else json.dumps(config, sort_keys=True), config_hash, model,
                 json.dumps(versions, sort_keys=True), json.dumps(hardware, sort_keys=True), time.time()))
            run = self._run_where("task = ? AND name = ?", (task, name))[0]
        if run.config_hash != config_hash:
            raise ValueError(f"config {name!r} on task {task!r} differs from the one this database ran under that "
                             f"name ({run.config}); rename it or use another --db")
        if run.task_hash != task_hash:
            raise ValueError(f"task {task!r} (its data or options) differs from the one this database ran "
                             f"({run.task_spec}); give it another name or use another --db")
        return run

    def _run_where(self, where: str, args: tuple = ()) -> list[Run]:
        rows = self.conn.execute(
            "SELECT run_id, name, kind, task, task_hash, task_json, config_json, config_hash, model FROM runs"
            f" WHERE {where} ORDER BY run_id", args).fetchall()
        return [Run(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), None if r[6] is None else json.loads(r[6]),
                    r[7], r[8]) for r in rows]

    def runs(self) -> list[Run]:
        return self._run_where("1")

    def done(self, run_id: int) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT item_id FROM results WHERE run_id = ?", (run_id,))}

    def counts(self) -> dict[int, int]:
        return dict(self.conn.execute("SELECT run_id, COUNT(*) FROM results GROUP BY run_id").fetchall())

    # ---- claims --------------------------------------------------------------------------------------------
    def claim(self, run_id: int, item_ids: Iterable[str], owner: str | None = None) -> set[str]:
        """Claim `item_ids` of the run for `owner` (default: this process); returns those it now holds: not
        stored yet, and not claimed by another process that is still running."""
        owner = owner or process_owner()
        ids = list(item_ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        with self.transaction():
            done = {r[0] for r in self.conn.execute(
                f"SELECT item_id FROM results WHERE run_id = ? AND item_id IN ({marks})", (run_id, *ids))}
            held = {item: (who, when) for item, who, when in self.conn.execute(
                f"SELECT item_id, owner, time FROM claims WHERE run_id = ? AND item_id IN ({marks})", (run_id, *ids))}
            mine = [i for i in ids if i not in done and (i not in held or held[i][0] == owner
                                                          or not _alive(*held[i]))]
            now = time.time()
            self.conn.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                                  [(run_id, i, owner, now) for i in mine])
        return set(mine)

    def release(self, owner: str | None = None) -> None:
        """Drop every claim of `owner` (default: this process)."""
        with self.transaction():
            self.conn.execute("DELETE FROM claims WHERE owner = ?", (owner or process_owner(),))

    # ---- tasks and skipped items ---------------------------------------------------------------------------
    def set_items(self, task: str, items: int) -> None:
        """Record how many items `task` was asked to run (the largest count asked so far)."""
        with self.transaction():
            self.conn.execute("INSERT INTO tasks VALUES (?, ?) ON CONFLICT (task) DO UPDATE SET "
                              "items = MAX(items, excluded.items)", (task, items))

    def items(self) -> dict[str, int]:
        """task -> the number of items it was asked to run."""
        return dict(self.conn.execute("SELECT task, items FROM tasks").fetchall())

    def skip(self, task: str, reasons: dict[str, str]) -> None:
        """Record items of `task` that could not be run: item id -> why."""
        if reasons:
            with self.transaction():
                self.conn.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)",
                                      [(task, i, r) for i, r in reasons.items()])

    def unskip(self, task: str, item_ids: Iterable[str]) -> None:
        """Items that ran after all (their file was fixed) are no longer skipped."""
        ids = list(item_ids)
        if ids:
            with self.transaction():
                self.conn.executemany("DELETE FROM skipped WHERE task = ? AND item_id = ?", [(task, i) for i in ids])

    def skipped(self) -> dict[str, dict[str, str]]:
        """task -> {item id: reason} of the items that could not be run."""
        out: dict[str, dict[str, str]] = {}
        for task, item, reason in self.conn.execute("SELECT task, item_id, reason FROM skipped ORDER BY task, item_id"):
            out.setdefault(task, {})[item] = reason
        return out

    def expected_rows(self) -> dict[str, int]:
        """task -> the rows a complete run holds: the task's recorded item count less its skipped items (for a
        database written before item counts were recorded: its largest run)."""
        items, skipped, counts = self.items(), self.skipped(), self.counts()
        out: dict[str, int] = {}
        for run in self.runs():
            if run.task in items:
                out[run.task] = items[run.task] - len(skipped.get(run.task, {}))
            else:
                out[run.task] = max(out.get(run.task, 0), counts.get(run.run_id, 0))
        return out

    # ---- results -------------------------------------------------------------------------------------------
    def add(self, run_id: int, rows: Iterable[Row]) -> int:
        """Insert a batch of rows in one transaction; returns how many were new (a row another process stored
        first is kept, never duplicated)."""
        with self.transaction():
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, r.item_id, r.prediction, int(bool(r.correct)), json.dumps(r.metrics), r.avg_T,
                  r.kv_entries, r.kv_unrouted, r.flops, r.flops_unrouted,
                  None if r.recall is None else json.dumps(r.recall),
                  None if r.routing is None else json.dumps(r.routing), r.seconds, r.rank) for r in rows])
            return self.conn.total_changes - before

    def rows(self, run_id: int) -> list[Row]:
        out = []
        for r in self.conn.execute(
                "SELECT item_id, prediction, correct, metrics_json, avg_T, kv_entries, kv_unrouted, flops,"
                " flops_unrouted, recall_json, routing_json, seconds, rank FROM results WHERE run_id = ?"
                " ORDER BY item_id", (run_id,)):
            out.append(Row(r[0], r[1], bool(r[2]), json.loads(r[3]), r[4], r[5], r[6], r[7], r[8],
                           None if r[9] is None else json.loads(r[9]), None if r[10] is None else json.loads(r[10]),
                           r[11], r[12]))
        return out

    def close(self) -> None:
        self.conn.close()


def process_owner() -> str:
    """This process as a claim's owner: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str, when: float) -> bool:
    """Whether the process that made a claim may still be computing it."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - when < CLAIM_SECONDS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(identity: dict) -> str:
    if "models" in identity:  # a study's index over several models (visroute.evaluation.layout)
        labels = ", ".join(repr(m.get("label")) for m in identity["models"])
        return f"grid {identity.get('grid')!r} version {identity.get('version')}, models {labels}"
    model = dict(identity.get("model", {}))
    text = f"grid {identity.get('grid')!r} version {identity.get('version')}, model {model.pop('path', None)!r}"
    rest = ", ".join(f"{k} {v}" for k, v in sorted(model.items()) if v is not None)  # dtype, box frame, ...
    return f"{text} ({rest})" if rest else text


def _use_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL mode, retrying while another process holds the lock: unlike other statements, the switch
    fails at once with "database is locked" instead of waiting (two processes opening a new database)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): writers queue on the database lock instead of failing."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False

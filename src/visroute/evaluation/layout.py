"""Where a grid's results live, and what a study records beside them.

A grid with one model writes one results database, the `--db` given. A grid with several (`models:`) writes one
database per model, named after `--db` and the model's label (`study.sqlite` -> `study.<label>.sqlite`), each
bound to the grid and that one model exactly as a single-model run with `--model` is: every database keeps the
crash-safety, resumption, sharing between processes and refusal of another grid's results of
`visroute.evaluation.store`, and one model's database is a valid input on its own (`study report`,
`study pooled`). The `--db` itself becomes the study's index: a results database without runs, bound to the
grid's name, version and its list of models (label and fingerprint each), so that `study list` and
`study report` given the index read every model's database, and a rerun with another list of models is refused
as another grid would be (use another `--db`).

Every database also records the grid's declared primary contrasts (a note beside its identity, not part of
it): `study report` tests them, Holm-corrected, without being given the grid again. A rerun records the grid's
current declaration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visroute.evaluation.grid import Contrast, Grid
from visroute.evaluation.store import Store

PRIMARY_NOTE = "primary"


def model_db(db: str | Path, label: str) -> Path:
    """One model's database of a multi-model study: `study.sqlite` -> `study.<label>.sqlite`."""
    db = Path(db)
    return db.with_name(f"{db.stem}.{label}{db.suffix}") if db.suffix else db.with_name(f"{db.name}.{label}")


def index_identity(grid: Grid) -> dict[str, Any]:
    """What a multi-model study's index is bound to: the grid and its models (label and fingerprint each)."""
    return {"grid": grid.name, "version": grid.version,
            "models": [{"label": m.label, **m.fingerprint()} for m in grid.models]}


def is_index(identity: dict[str, Any]) -> bool:
    return "models" in identity


def databases(db: str | Path) -> dict[str, Path]:
    """Model label -> results database of the study at `db`: every model's database for an index, else `db`
    itself (labelled by its model)."""
    from visroute.evaluation.grid import model_label

    store = Store(db)
    try:
        identity = store.identity
    finally:
        store.close()
    if is_index(identity):
        return {m["label"]: model_db(db, m["label"]) for m in identity["models"]}
    return {model_label(str((identity.get("model") or {}).get("path") or Path(db).stem)): Path(db)}


def record_primary(store: Store, contrasts: list[Contrast]) -> None:
    """Write the grid's declared primary contrasts into `store`'s notes."""
    store.set_note(PRIMARY_NOTE, [{"a": c.a, "b": c.b, "items": c.items} for c in contrasts])


def primary_contrasts(db: str | Path) -> list[Contrast]:
    """The primary contrasts the grid declared when the study at `db` was last run ([] when none)."""
    store = Store(db)
    try:
        entries = store.note(PRIMARY_NOTE) or []
    finally:
        store.close()
    return [Contrast(**e) for e in entries]


def open_study(grid: Grid, db: str | Path) -> dict[str, tuple[Grid, Path]]:
    """Model label -> (the grid on that model, its database) for running `grid` into `db`; for several models
    the index at `db` is bound (or checked) first, so that another list of models is refused before anything
    runs. The primary contrasts are recorded in the index; each model's database records them when it runs
    (`note_primary`)."""
    if not grid.multi_model:
        return {grid.model.label: (grid, Path(db))}
    store = Store(db, index_identity(grid))
    try:
        record_primary(store, grid.primary)
    finally:
        store.close()
    return {m.label: (grid.for_model(m), model_db(db, m.label)) for m in grid.models}


def note_primary(grid: Grid, db: str | Path) -> None:
    """Record `grid`'s primary contrasts in its database `db`, if the run has written it."""
    if not Path(db).is_file():
        return
    store = Store(db, grid.identity())
    try:
        record_primary(store, grid.primary)
    finally:
        store.close()


def describe(identity: dict[str, Any]) -> str:
    """One line naming a database's grid and model(s)."""
    from visroute.evaluation.store import _describe

    return _describe(identity)

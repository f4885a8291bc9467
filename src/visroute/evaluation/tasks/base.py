"""What a task is: it reads local files into `TaskItem`s, poses each item's question and scores an answer.

A task class sets `name`, `description`, `instruction` (appended to every question), `max_new_tokens`,
`options` (name -> (default, help), settable from a grid) and `data_keys` (the paths it reads: "data" for the
main file, others such as GQA's "images"), and implements `load` (the items) and `score` (one answer). The
metric values `score` returns are stored per item; `aggregate` turns the stored values of a run into the task's
metrics, so a report needs the database only."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image, ImageFile

from visroute.evaluation import metrics as M


@dataclass
class TaskItem:
    """One question of a task.

    id:        unique within the task (stable across runs: resuming and pairing rely on it).
    question:  the question as the benchmark poses it (the task adds its answer instruction).
    answers:   reference answers (any one counts).
    kind:      "short" (a word or phrase), "yesno", "box", "choice" or "count".
    box:       for box answers: the true box, normalised (x1, y1, x2, y2) of the first image.
    hops:      relevance, when the task knows it: per hop, the regions of the first image (normalised boxes)
               that hold what the question needs; the runner maps them to visual tokens with the model's
               `ImageFrame.tokens_of`. Box tasks default to one hop, the true box.
    meta:      what `score` and `aggregate` read besides the answer (category, image id, ...).
    images:    a function returning the item's PIL images (read only when the item is run).
    problem:   why the item cannot be posed (its row lacks the question or the answer), else None: the runner
               records such an item as skipped, with this reason, and never scores it."""

    id: str
    question: str
    answers: list[str]
    kind: str = "short"
    box: list[float] | None = None
    hops: list[list[list[float]]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: Callable[[], list[Image.Image]] = field(default=lambda: [], repr=False)
    problem: str | None = None

    @property
    def relevance_regions(self) -> list[list[list[float]]] | None:
        if self.hops is not None:
            return self.hops
        return [[self.box]] if self.box is not None else None


class Task:
    """Base class of tasks. `Task(data={"data": path, ...}, limit=None, **options)`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    instruction: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 16
    options: ClassVar[dict[str, tuple[Any, str]]] = {}
    data_keys: ClassVar[tuple[str, ...]] = ("data",)
    required_keys: ClassVar[tuple[str, ...]] = ("data",)
    cluster_key: ClassVar[str | None] = None  # a meta field whose items are resampled together
    headline: ClassVar[tuple[str, ...]] = ()  # aggregate metrics the report tables show beside accuracy

    def __init__(self, data: dict[str, str] | str | None = None, limit: int | None = None, **options: Any):
        if isinstance(data, (str, Path)):
            data = {"data": str(data)}
        self.data = {k: str(v) for k, v in (data or {}).items()}
        unknown = sorted(set(self.data) - set(self.data_keys))
        if unknown:
            raise ValueError(f"task {self.name!r} reads no data {unknown}; its data keys: {', '.join(self.data_keys)}")
        bad = sorted(set(options) - set(self.options) - {"instruction", "max_new_tokens"})
        if bad:
            known = ", ".join(sorted(set(self.options) | {"instruction", "max_new_tokens"}))
            raise ValueError(f"task {self.name!r} has no option {bad[0]!r}; its options: {known}")
        self.opts = {k: v for k, (v, _) in self.options.items()}
        self.opts.update(options)
        self.instruction = options.get("instruction", type(self).instruction)
        self.max_new_tokens = int(options.get("max_new_tokens", type(self).max_new_tokens))
        if limit is not None and limit < 1:
            raise ValueError(f"task {self.name!r}: limit must be at least 1, got {limit}")
        self.limit = limit

    # ---- identity ------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What makes two runs of this task comparable: its name, data and options (not the limit: a larger
        limit adds items to the same runs)."""
        return {"task": self.name, "data": self.data, "options": self.opts, "instruction": self.instruction,
                "max_new_tokens": self.max_new_tokens}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    # ---- items ---------------------------------------------------------------------------------------------
    def path(self, key: str = "data") -> Path:
        """The path given for `key`, checked to exist."""
        if key not in self.data:
            raise ValueError(f"task {self.name!r} needs a {key!r} path (grid `data:` or --data {self.name}.{key}=PATH)"
                             if key != "data" else
                             f"task {self.name!r} needs a data path (grid `data:` or --data {self.name}=PATH)")
        p = Path(self.data[key]).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"task {self.name!r}: {key} path {p} does not exist")
        return p

    def items(self) -> list[TaskItem]:
        """The task's items (the first `limit`), ids checked unique."""
        for key in self.required_keys:
            self.path(key)
        out = self.load(self.limit)
        if self.limit is not None:
            out = out[: self.limit]
        seen: set[str] = set()
        for it in out:
            if it.id in seen:
                raise ValueError(f"task {self.name!r}: item id {it.id!r} occurs twice")
            seen.add(it.id)
            if it.problem is None and not (isinstance(it.question, str) and it.question.strip()):
                it.problem = "its row has no question"
            elif it.problem is None and not it.answers and it.box is None:
                it.problem = "its row has no answer"
        return out

    def load(self, limit: int | None) -> list[TaskItem]:
        raise NotImplementedError

    def text(self, item: TaskItem) -> str:
        """The question as the model sees it: the question, then the answer instruction."""
        return item.question + self.instruction

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        """Metric values of one answer; always holds "correct". `frame` is the first image's `ImageFrame`
        (converts box answers from the model's frame), None for items without images."""
        raise NotImplementedError

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Task metrics from the stored per-item values of one run (default: accuracy)."""
        return {"accuracy": float(np.mean([r["correct"] for r in rows])) if rows else float("nan")}

    # ---- shared scoring helpers ----------------------------------------------------------------------------
    def score_box(self, item: TaskItem, prediction: str, frame) -> dict[str, Any]:
        """IoU of the answer's box (converted from the model's answer frame) with the true box; correct at
        IoU >= 0.5. An answer without a box scores IoU 0."""
        from visroute.evaluation.boxes import answer_box, box_iou, center_inside

        pred = None if frame is None else answer_box(prediction, frame)
        if pred is None:
            return {"correct": False, "iou": 0.0, "center": False, "box": None}
        iou = box_iou(pred, item.box)
        return {"correct": iou >= 0.5 - M.IOU_TOLERANCE, "iou": iou, "center": center_inside(pred, item.box),
                "box": [round(v, 6) for v in pred]}


# ---- reading the public layouts ----------------------------------------------------------------------------------
def read_table(path: Path, task: str, columns: tuple[str, ...], split: str | None = None) -> Any:
    """A `datasets.Dataset` from a Parquet file, a JSON / JSONL file, a `save_to_disk` folder, or a folder of
    Parquet shards as the Hub gives them (a snapshot folder with `data/<split>-0000k-of-0000n.parquet`, a subset
    folder such as POPE's `Full/`, or the shards themselves). A folder holding several splits takes `split` (one
    of them, or "all" for every shard), or its only split. Raises naming the file: empty, unreadable, or missing
    columns."""
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = _from_disk(datasets, path, task, split)
        else:
            ds = _from_shards(datasets, path, task, split)
    else:
        suffix = path.suffix.lower()
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(suffix)
        if builder is None:
            raise ValueError(f"task {task!r}: cannot read {path}: expected .parquet, .json, .jsonl or a "
                             f"datasets folder")
        if path.stat().st_size == 0:
            raise ValueError(f"task {task!r}: data file {path} is empty")
        if builder == "json":
            _check_json(path, task)
        ds = _load(datasets, builder, [str(path)], task, path)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"task {task!r}: {path} lacks the column(s) {', '.join(missing)} "
                         f"(it has {', '.join(ds.column_names)})")
    return ds


def _load(datasets, builder: str, files: list[str], task: str, path: Path):
    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # datasets wraps the reader's error in its own; name the file in one line
        cause = e.__cause__ or e.__context__ or e
        what = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ValueError(f"task {task!r}: cannot read {path}: {what}") from None


def _check_json(path: Path, task: str) -> None:
    """A JSON Lines file: every line parses (names the first bad line); a .json file: parses as a whole."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"task {task!r}: data file {path} is empty")
    try:
        json.loads(text)
        return  # one JSON document (a list of rows, or one row)
    except json.JSONDecodeError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"task {task!r}: line {n} of {path} is not valid JSON ({e.msg})") from None


def _from_disk(datasets, path: Path, task: str, split: str | None):
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) != 1:
            raise ValueError(f"task {task!r}: {path} holds the splits {names}; choose one with the option split")
        if split is not None and split not in ds:
            raise ValueError(f"task {task!r}: {path} has no split {split!r}; its splits: {names}")
        ds = ds[split or names[0]]
    return ds


_SHARD = re.compile(r"^(?P<split>.+?)(-\d{5}-of-\d{5})?(-[0-9a-f]{8,})?\.parquet$")


def _from_shards(datasets, path: Path, task: str, split: str | None):
    """A folder of Parquet shards: those in `data/` (a Hub snapshot), else those in the folder itself, grouped by
    split (the file name before `-0000k-of-0000n`)."""
    folder = path / "data" if (path / "data").is_dir() else path
    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.rglob("*.parquet")))
        hint = f"; its subset folders: {', '.join(subsets)} (give one as the data path)" if subsets else ""
        raise ValueError(f"task {task!r}: {path} is neither a datasets folder nor a folder of Parquet shards{hint}")
    splits: dict[str, list[Path]] = {}
    for p in shards:
        splits.setdefault(_SHARD.match(p.name).group("split"), []).append(p)
    names = sorted(splits)
    if split is None and len(names) != 1:
        raise ValueError(f"task {task!r}: {folder} holds the splits {names}; choose one with the option split "
                         f"(or split: all)")
    if split not in (None, "all") and split not in splits:
        raise ValueError(f"task {task!r}: {folder} has no split {split!r}; its splits: {names}")
    files = shards if split == "all" else splits[split or names[0]]
    empty = [p for p in files if p.stat().st_size == 0]
    if empty:
        raise ValueError(f"task {task!r}: data file {empty[0]} is empty")
    return _load(datasets, "parquet", [str(p) for p in files], task, folder)


class UnreadableImage(ValueError):
    """An item's image is missing, truncated or not an image (the runner skips the item, or stops under
    --strict)."""


def to_image(value: Any, root: Path) -> Image.Image:
    """A PIL image from what a data file holds: an image, a path (relative to the file), or {"bytes", "path"}.
    Raises UnreadableImage naming the file when it is missing or cannot be decoded."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    source: Any = None
    if isinstance(value, dict):
        if value.get("bytes"):
            source, name = io.BytesIO(value["bytes"]), f"the image bytes of {value.get('path') or 'the row'}"
        else:
            value = value.get("path")
    if source is None:
        if not isinstance(value, str):
            raise UnreadableImage(f"cannot read an image from a {type(value).__name__}")
        p = Path(value) if Path(value).is_absolute() else root / value
        if not p.is_file():
            raise UnreadableImage(f"image {p} does not exist")
        source, name = p, f"image {p}"
    # lmms-eval turns PIL's LOAD_TRUNCATED_IMAGES on for the whole process when imported; a truncated file must
    # still be a skipped item, not an image padded with grey.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(source) as im:  # decoding happens in convert: a truncated file fails there
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"cannot read {name}: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def answer_list(value: Any) -> list[str]:
    """A row's reference answer(s) as strings: a missing or null answer is [] (never the string "None")."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def row_images(ds, index: int, column: str, root: Path) -> Callable[[], list[Image.Image]]:
    """A loader of row `index`'s image (decoded only when called)."""
    return lambda: [to_image(ds[index][column], root)]


def plain_rows(ds, exclude: tuple[str, ...] = ("image",)) -> list[dict[str, Any]]:
    """The rows without their image columns (fast: images are not decoded)."""
    keep = [c for c in ds.column_names if c not in exclude]
    return ds.select_columns(keep).to_list()

"""The testbed: synthetic grounded-VQA scenes whose relevant visual tokens are known, and a small trained
LLaVA-architecture model shipped with the package.

    from visroute.testbed import load_model, make_items, Evaluator, format_table
    model, processor = load_model()                     # the shipped checkpoint, float32 on CPU
    ev = Evaluator(model, processor, make_items(300, seed=HELDOUT_SEED))
    print(format_table(ev.compare({"unrouted": None, "fastv": cfg}), ev.items))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from visroute.lazy import lazy_exports
from visroute.testbed.data import (
    HELDOUT_SEED,
    Item,
    blank_tokens,
    make_item,
    make_items,
    read_dataset,
    with_blank_context,
    with_bordering_tokens,
    write_dataset,
)
from visroute.testbed.questions import FAMILIES, VISION_FAMILIES

if TYPE_CHECKING:
    from visroute.testbed.evaluate import EvalReport, Evaluator, ItemResult, box_iou, format_table, majority_rates, score

# The evaluator runs on the evaluation harness, which reads this package's data and checkpoint: its names load on
# first use (PEP 562), so that importing the testbed's data does not import the harness (no import cycle).
_EVALUATOR_NAMES = ("Evaluator", "EvalReport", "ItemResult", "format_table", "majority_rates", "score", "box_iou")


__getattr__ = lazy_exports(__name__, {name: "visroute.testbed.evaluate" for name in _EVALUATOR_NAMES})


def checkpoint_path() -> Path:
    """The folder of the shipped testbed checkpoint (a Hugging Face model folder with its processor)."""
    return Path(__file__).resolve().parent / "checkpoint"


DEFAULT_MODEL = "testbed-v3-b-drop4k"  # the name of the checkpoint shipped in the package
DEFAULT_WORLD = 3  # the scene generator it was trained on: the command line's and the harness task's default
MODELS_ENV = "VISROUTE_TESTBED_MODELS"  # a folder of further named checkpoints (default: models/ in the repository)


def models_dir() -> Path:
    """The folder of the named testbed checkpoints kept outside the package: one Hugging Face folder per name
    (`$VISROUTE_TESTBED_MODELS`, else `models/` at the root of the repository this package is installed from)."""
    return Path(os.environ.get(MODELS_ENV) or Path(__file__).resolve().parents[3] / "models")


def model_names() -> list[str]:
    """Every testbed model `load_model` knows by name: the shipped one first."""
    folder = models_dir()
    extra = sorted(p.name for p in folder.iterdir() if (p / "config.json").exists()) if folder.is_dir() else []
    return [DEFAULT_MODEL] + [n for n in extra if n != DEFAULT_MODEL]


def training_dir() -> Path:
    """The folder of the training runs kept in the repository as their compact state (`training/` at the root of
    the repository this package is installed from): one folder per run, named as the model it trains."""
    return Path(__file__).resolve().parents[3] / "training"


def candidate_names() -> list[str]:
    """Models kept only as a finished training run's compact state (`training_dir`): loadable by name like the
    shipped ones and tested like them against the unrouted bars on a small fixed set (TRAINING.md says which of
    the other bars each meets)."""
    from visroute.testbed.train import compact_state

    folder = training_dir()
    runs = sorted(p.name for p in folder.iterdir() if compact_state(p)) if folder.is_dir() else []
    return [n for n in runs if n not in model_names()]


def model_path(model: str | Path | None = None) -> Path:
    """The checkpoint folder of `model`: a name (`model_names`, `candidate_names`), a folder, or None for the
    shipped one. A candidate is exported from its compact state into `training/NAME/model/` on first use."""
    if model is None or str(model) == DEFAULT_MODEL:
        return checkpoint_path()
    if (Path(model) / "config.json").exists():
        return Path(model)
    named = models_dir() / str(model)
    if (named / "config.json").exists():
        return named
    if str(model) in candidate_names():
        from visroute.testbed.train import compact_state, export_state

        state = compact_state(training_dir() / str(model))
        folder = state.parent / "model"
        if not (folder / "config.json").exists() or (folder / "config.json").stat().st_mtime < state.stat().st_mtime:
            export_state(state, folder)
        return folder
    raise FileNotFoundError(f"no testbed model {str(model)!r}: neither a checkpoint folder nor one of the names "
                            f"{', '.join(model_names() + candidate_names())}")


def load_model(path: str | Path | None = None, dtype=None):
    """(model, processor) of a testbed checkpoint, in eval mode on CPU: `path` a name (`model_names`), a
    checkpoint folder, or None for the shipped one."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = model_path(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation="sdpa"
    ).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


__all__ = [
    "checkpoint_path", "load_model", "model_path", "model_names", "models_dir", "DEFAULT_MODEL", "DEFAULT_WORLD",
    "candidate_names", "training_dir",
    "Item", "make_item", "make_items", "read_dataset", "write_dataset",
    "blank_tokens", "with_blank_context", "with_bordering_tokens",
    "Evaluator", "EvalReport", "ItemResult", "format_table", "majority_rates", "score", "box_iou",
    "HELDOUT_SEED", "FAMILIES", "VISION_FAMILIES",
]

"""The testbed: synthetic grounded-VQA scenes whose relevant visual tokens are known, and a small trained
LLaVA-architecture model shipped with the package.

    from visroute.testbed import load_model, make_items, Evaluator, format_table
    model, processor = load_model()                     # the shipped checkpoint, float32 on CPU
    ev = Evaluator(model, processor, make_items(300, seed=HELDOUT_SEED))
    print(format_table(ev.compare({"unrouted": None, "fastv": cfg}), ev.items))
"""

from __future__ import annotations

from pathlib import Path

from visroute.testbed.data import Item, make_item, make_items, read_dataset, with_bordering_tokens, write_dataset
from visroute.testbed.evaluate import (
    HELDOUT_SEED,
    EvalReport,
    Evaluator,
    ItemResult,
    box_iou,
    evaluate,
    format_table,
    majority_rates,
    score,
)
from visroute.testbed.questions import FAMILIES, VISION_FAMILIES


def checkpoint_path() -> Path:
    """The folder of the shipped testbed checkpoint (a Hugging Face model folder with its processor)."""
    return Path(__file__).resolve().parent / "checkpoint"


def load_model(path: str | Path | None = None, dtype=None):
    """(model, processor) of a testbed checkpoint (default: the shipped one), in eval mode on CPU."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else checkpoint_path()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no testbed checkpoint in {folder}")
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation="sdpa"
    ).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


__all__ = [
    "checkpoint_path", "load_model", "Item", "make_item", "make_items", "read_dataset", "write_dataset",
    "with_bordering_tokens",
    "Evaluator", "EvalReport", "ItemResult", "evaluate", "format_table", "majority_rates", "score", "box_iou",
    "HELDOUT_SEED", "FAMILIES", "VISION_FAMILIES",
]

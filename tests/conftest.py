import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust to a busy machine
warnings.filterwarnings("ignore", message=".*bos_token_id.*")

from tiny import llava_batch, qwen_batch, tiny_llava, tiny_qwen  # noqa: E402

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]]


class Family:
    """A tiny model of one family with its padded batch of 3 different prompts."""

    def __init__(self, name):
        self.name = name
        if name == "llava":
            self.build = lambda attn="sdpa": tiny_llava(attn=attn)
            self.image_token_id = 100
        else:
            version = "2.5" if name == "qwen2.5" else "2"
            self.build = lambda attn="sdpa", v=version: tiny_qwen(v, attn=attn)
            self.image_token_id = 110
        self.model = self.build()

    def batch(self, prompts=PROMPTS):
        if self.name == "llava":
            return llava_batch(self.model, prompts, [1, 2, 1][: len(prompts)])
        grids = [[(8, 8)], [(4, 8), (8, 4)], [(8, 12)]]
        return qwen_batch(self.model, prompts, grids[: len(prompts)])

    def single(self, i):
        """Sample i of the batch, alone (no padding)."""
        return _slice_llava(self, i) if self.name == "llava" else _slice_qwen(self, i)


def _slice_llava(fam, i):
    full = fam.batch()
    keep = full["attention_mask"][i].bool()
    per = fam.model.config.image_seq_length
    counts = [1, 2, 1]
    start = sum(counts[:i])
    return {
        "input_ids": full["input_ids"][i][keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "pixel_values": full["pixel_values"][start : start + counts[i]],
    }


def _slice_qwen(fam, i):
    full = fam.batch()
    keep = full["attention_mask"][i].bool()
    grids = [[(8, 8)], [(4, 8), (8, 4)], [(8, 12)]]
    patch_counts = [h * w for g in grids for h, w in g]
    img_index = sum(len(g) for g in grids[:i])
    start = sum(patch_counts[:img_index])
    n = sum(patch_counts[img_index : img_index + len(grids[i])])
    return {
        "input_ids": full["input_ids"][i][keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "mm_token_type_ids": full["mm_token_type_ids"][i][keep][None],
        "pixel_values": full["pixel_values"][start : start + n],
        "image_grid_thw": full["image_grid_thw"][img_index : img_index + len(grids[i])],
    }


_FAMILIES = {}


def family(name) -> Family:
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name)
    return _FAMILIES[name]


@pytest.fixture(params=["llava", "qwen2.5"])
def fam(request):
    return family(request.param)


@pytest.fixture(params=["llava", "qwen2.5", "qwen2"])
def any_fam(request):
    return family(request.param)

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

from oracle import eager_copy  # noqa: E402
from tiny import FAMILIES, TinyFamily  # noqa: E402

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]]


class Family:
    """A tiny model of one family (a row of `tiny.FAMILIES`) with its padded batch of 3 different prompts
    (several images per sample; Qwen images of different sizes)."""

    def __init__(self, row: TinyFamily):
        self.row = row
        self.name = row.name
        self.image_token_id = row.image_token_id
        self.build = row.build
        self.model = row.build()
        self._eager = None

    @property
    def eager(self):
        """The same weights with eager attention (for the oracles), built once."""
        if self._eager is None:
            self._eager = eager_copy(self.model, self.build)
        return self._eager

    def images(self, n: int = len(PROMPTS)):
        return self.row.images[:n]

    def batch(self, prompts=PROMPTS):
        return self.row.batch(self.model, prompts)

    def single(self, i, prompts=PROMPTS):
        """Sample i of the batch, alone (no padding)."""
        return self.row.select(self.batch(prompts), self.images(len(prompts)), [i], strip_padding=True)

    def select(self, inputs, rows, prompts=PROMPTS):
        """Rows of the standard batch (repeats allowed), with their images."""
        return self.row.select(inputs, self.images(len(prompts)), rows)


_FAMILIES = {}


def family(name) -> Family:
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(FAMILIES[name])
    return _FAMILIES[name]


QUICK = [name for name, row in FAMILIES.items() if row.quick]
EVERY = list(FAMILIES)


@pytest.fixture(params=QUICK)
def fam(request):
    return family(request.param)


@pytest.fixture(params=EVERY)
def any_fam(request):
    return family(request.param)


@pytest.fixture(scope="session")
def saved_llava(tmp_path_factory):
    """A tiny LLaVA and its processor saved with save_pretrained, and an image file: (folder, image)."""
    import numpy as np
    from PIL import Image

    from tiny import tiny_llava, tiny_llava_processor

    folder = tmp_path_factory.mktemp("tiny-llava")
    model = tiny_llava()
    model.save_pretrained(folder)
    tiny_llava_processor(model).save_pretrained(folder)
    image = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(image)
    return folder, image

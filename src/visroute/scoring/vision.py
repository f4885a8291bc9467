"""Vision-tower attention: how much the vision encoder itself attends to each patch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visroute.scoring import option, register
from visroute.scoring.base import Scorer, StageContext


@register
class VisionCLSAttention(Scorer):
    """VisionZip (Yang et al., 2025) / FasterVLM (Zhang et al., 2024): the attention of the vision tower's
    [CLS] token to each patch at one tower layer, summed over heads:

        s_j = sum_h softmax_k(q_h(CLS) . k_h(k) / sqrt(d))[j]

    By default at the layer whose output the projector reads (LLaVA-1.5: the second-to-last, VisionZip's and
    FasterVLM's `attentions[-2]`). For towers without [CLS] (Qwen2-VL / Qwen2.5-VL's ViT) each patch scores the
    mean attention it receives from the queries it is visible to at that layer (its image, or its window in
    Qwen2.5-VL's windowed blocks), summed over heads; a merged token (2x2 patches) scores the mean of its
    patches. Scores are comparable within an image; across the images of a sample each image's scores sum to
    about one, as in the papers, which handle one image at a time.

    The row is computed from a forward pre-hook on that one tower layer's attention (its own q/k, fp32), not by
    switching the tower to eager attention. Under `generate` the tower runs before the prefill; the hook keeps
    the scores of the latest tower call until the next prefill begins and takes them. The scores do not depend
    on the stage: a layer-0 stage prunes before the decoder, as VisionZip and FasterVLM do."""

    name = "vision_cls_attention"
    description = "vision-tower [CLS] attention to each patch, sum over heads (VisionZip, FasterVLM); no-[CLS] towers: mean attention received"
    before_decoder = True

    @dataclass(frozen=True)
    class Options:
        layer: int | None = option(None, "vision-tower layer, 0-based, negative from the end; None = the layer the "
                                         "projector reads")

    def __init__(self, **options):
        super().__init__(**options)
        self._handles: list = []
        self._fresh: torch.Tensor | None = None  # from the latest tower call
        self._current: torch.Tensor | None = None  # taken by the current prefill

    def attach(self, adapter) -> None:
        self._handles = adapter.hook_vision_scores(self.options.layer, self._receive)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._fresh = self._current = None

    def _receive(self, scores: torch.Tensor) -> None:
        self._fresh = scores

    def begin_prefill(self) -> None:
        self._current, self._fresh = self._fresh, None

    def score(self, ctx: StageContext) -> torch.Tensor:
        if self._current is None:
            raise ValueError(
                "vision_cls_attention: the vision tower did not run for this call (image features passed in "
                "pre-computed?); it needs pixel values"
            )
        flat = self._current
        valid = ctx.layout.valid
        if flat.numel() != int(valid.sum()):
            raise ValueError(
                f"vision_cls_attention: the vision tower scored {flat.numel()} tokens but the batch holds "
                f"{int(valid.sum())} visual tokens"
            )
        out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        out[valid] = flat.to(valid.device)
        return out

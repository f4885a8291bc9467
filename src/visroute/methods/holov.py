"""HoloV (Zou et al., NeurIPS 2025, "Don't Just Chase 'Highlighted Tokens' in MLLMs"; `obananas/HoloV`): before the
decoder, per-crop quotas (scorer `holov`, `visroute.scoring.frontier`, which names every departure). The crop count
follows the count: max(1, int(1024/576 x N / k)) (16 at 64 of 576 tokens, the released LLaVA setting)."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

register_method(Method(
    "holov", "HoloV (Zou et al., NeurIPS 2025; released code): before the decoder, each image cut into "
    "max(1, int(1024/576 x N / k)) contiguous crops with quotas by mean scaled attention + 0.09 x scaled "
    "similarity variance of the projected tokens, each crop keeping its quota by attention", layer0("holov")))

"""VisionZip (Yang et al., CVPR 2025): before the decoder, dominant tokens plus merged contextual tokens (scorer
and merge `visionzip`, `visroute.scoring.visionzip`)."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

register_method(Method(
    "visionzip", "VisionZip (Yang et al., 2025): before the decoder, dominant tokens by the tower's [CLS] attention "
    "plus contextual tokens (54 + 10, 108 + 20, 162 + 30: a 10/64 share) into which the rest are merged by key "
    "similarity; [CLS] itself is not a visual token here, so all kept tokens are patches, each at its own position",
    layer0("visionzip", merge="visionzip")))

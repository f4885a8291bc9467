"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs"; `Theia-4869/VisPruner`): before the decoder, an important share by the tower's [CLS] attention,
then de-duplication of the rest (scorer `vispruner`, `visroute.scoring.frontier`, which names every departure).
The released scripts keep half by importance (`--important_ratio 0.5`, its argparse default) at every tier."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

IMPORTANT_RATIO = 0.5

register_method(Method(
    "vispruner", "VisPruner (Zhang et al., ICCV 2025; released code): before the decoder, per image half the keep by "
    "the tower's [CLS] attention (no [CLS]: attention received), the other half by iterative cosine de-duplication "
    "of the rest in the tower's feature space (no projector input: the decoder input embeddings)",
    layer0("vispruner", important_ratio=IMPORTANT_RATIO)))

"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"; `Theia-4869/CDPruner`): before the decoder, the greedy MAP of a conditional DPP (scorer
`cdpruner`, `visroute.scoring.frontier`, which names every departure). The released code has no per-tier setting
beyond the count."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

register_method(Method(
    "cdpruner", "CDPruner (Zhang et al., NeurIPS 2025; released code): before the decoder, per image the greedy MAP of "
    "a DPP with kernel diag(r) S diag(r), S the cosine of the projected tokens; r the relevance to the instruction "
    "measured with the decoder's input embeddings (the released LLaVA code uses CLIP's text tower, which the "
    "checkpoints do not carry)", layer0("cdpruner")))

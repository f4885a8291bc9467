"""SCOPE (Deng et al., NeurIPS 2025, "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel
LLMs"; `kinredon/SCOPE`): before the decoder, greedy saliency x coverage (scorer `scope`,
`visroute.scoring.frontier`, which names every departure). The released code has no per-tier setting beyond the
count (ALPHA = 1, "multi")."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

register_method(Method(
    "scope", "SCOPE (Deng et al., NeurIPS 2025; released code): before the decoder, per image greedy [CLS] attention "
    "x facility-location coverage gain over the tower's features", layer0("scope")))

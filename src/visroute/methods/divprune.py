"""DivPrune (Alvar et al., CVPR 2025): before the decoder, greedy max-min diversity (scorer `diversity`)."""

from __future__ import annotations

from visroute.methods import Method, layer0, register_method

register_method(Method(
    "divprune", "DivPrune (Alvar et al., 2025): before the decoder, greedy max-min cosine diversity over the "
    "projected visual tokens, keeping the tier's count", layer0("diversity")))

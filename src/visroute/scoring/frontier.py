"""The 2025 "important and diverse" selectors that act before the decoder: VisPruner, CDPruner, HoloV, SCOPE.
Each runs its selection primitive (`visroute.scoring.selection`) once per image on the candidate visual tokens,
with the image's share of the stage's keep (a sample's keep split over its images in proportion to their
candidates: the released code handles one image, or one LLaVA-NeXT tile, at a time), and returns scores whose
top k is exactly the selection (earlier picks score higher). Kept tokens stay at their own positions (the released
LLaVA code also keeps them in token order; HoloV concatenates them crop by crop, see `holov`).

Signals, as the released code reads them:
* importance: the vision tower's [CLS] attention to each patch at the layer the projector reads (LLaVA-1.5:
  `attentions[-2]`); towers without [CLS] (Qwen's ViT, SigLIP) give the mean attention a token receives
  (`vision_cls_attention`). VisPruner averages over heads and SCOPE sums, HoloV averages: the hook sums, which
  changes no ranking, no SCOPE pick (a constant factor on every gain) and no HoloV quota (its token score is
  homogeneous in the attention, up to its 1e-6 guards);
* features: VisPruner and SCOPE compare the tower's features (the projector's input), CDPruner and HoloV the
  projected ones (the decoder's input embeddings). Where the family has no projector input per visual token
  (Qwen, whose merger is its projector; LLaVA-NeXT / OneVision, which add newline tokens after it) all four use
  the decoder input embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visroute.merge import image_ids
from visroute.scoring import option, register
from visroute.scoring.base import Scorer, StageContext
from visroute.scoring.nuwa import TowerCapture, per_token, split_per_image
from visroute.scoring.redundancy import _order_to_scores, _unpicked
from visroute.scoring.selection import (
    DEDUP_STEP,
    HOLOV_BETA,
    cdpruner_relevance,
    conditional_dpp,
    holov_crops,
    importance_then_diversity,
    region_quotas,
    saliency_coverage,
)
from visroute.tensors import gather_rows


class PerImageSelection(Scorer):
    """Runs `select` once per image of each sample on its candidate visual tokens (in token order) and ranks the
    picks above every other token, in pick order. Subclasses implement `select`."""

    before_decoder = True

    def select(self, ctx: StageContext, sample: int, tokens: torch.Tensor, keep: int) -> torch.Tensor:
        """Pick `keep` of `tokens` (visual-token indices of one image of sample `sample`); returns indices into
        `tokens`, in pick order."""
        raise NotImplementedError

    def prepare(self, ctx: StageContext) -> None:
        """Called once per stage before the per-image selections (e.g. to gather features)."""

    def score(self, ctx: StageContext) -> torch.Tensor:
        valid = ctx.layout.valid
        device = valid.device
        b, nv = valid.shape
        image = image_ids(ctx).to(device)
        candidates = ctx.candidates.to(device) & valid
        share = split_per_image(image, candidates, ctx.budget().to(device))
        order = torch.full((b, nv), _unpicked(nv), dtype=torch.long, device=device)
        self.prepare(ctx)
        for s in range(b):
            taken = 0
            for i in range(len(ctx.layout.images[s])):
                tokens = (candidates[s] & (image[s] == i)).nonzero().flatten()
                if tokens.numel() == 0:
                    continue
                keep = int(share[s, tokens[0]])
                if keep <= 0:
                    continue
                picks = tokens[self.select(ctx, s, tokens, keep).to(device)]
                order[s, picks] = taken + torch.arange(picks.numel(), device=device)
                taken += picks.numel()
        return _order_to_scores(order)


class TowerSelection(PerImageSelection):
    """A per-image selection that reads the vision tower: its attention scores (`hook_vision_scores` at
    `Options.layer`) and, when `tower_features`, the projector's input per visual token (else, and where the
    family has none, the decoder input embeddings)."""

    tower_features = False

    @dataclass(frozen=True)
    class Options:
        layer: int | None = option(None, "vision-tower layer of the attention, 0-based, negative from the end; "
                                         "None = the layer the projector reads")

    def __init__(self, **options):
        super().__init__(**options)
        self._capture = TowerCapture(f"The {self.name} scorer")
        self._tower_space = False

    def attach(self, adapter) -> None:
        self._capture.add(adapter.hook_vision_scores(self.options.layer, self._capture.sink("scores")))
        handles = adapter.hook_projector_input(self._capture.sink("x")) if self.tower_features else None
        self._tower_space = handles is not None
        self._capture.add(handles)

    def detach(self) -> None:
        self._capture.remove()
        self._tower_space = False

    def begin_prefill(self) -> None:
        self._capture.begin()

    def prepare(self, ctx: StageContext) -> None:
        valid = ctx.layout.valid
        who = f"The {self.name} scorer"
        self._importance = per_token(self._capture.get("scores").float(), valid, who, "attention scores")
        if self._tower_space:
            self._features = per_token(self._capture.get("x").float(), valid, who, "features")
        else:
            self._features = gather_rows(ctx.inputs_embeds, ctx.layout.positions).float().to(valid.device)


@register
class VisPruner(TowerSelection):
    """VisPruner (Zhang et al., ICCV 2025; `Theia-4869/VisPruner`, `llava/model/llava_arch.py`): per image,
    int(k x `important_ratio`) tokens by the tower's [CLS] attention (mean over heads at `attentions[-2]`), then
    the rest de-duplicated by cosine of the tower features down to the remaining budget
    (`selection.importance_then_diversity`, at most `step` removals per matching round). The released default
    ratio is 0.5 (its scripts' and argparse default; the README's 64-token example uses 0.75).

    Departures: an odd number of residual tokens works (the released code fails there); fp32 and stable sorts."""

    name = "vispruner"
    description = "VisPruner: an important share by vision-tower [CLS] attention, then cosine de-duplication of the rest"
    tower_features = True

    @dataclass(frozen=True)
    class Options(TowerSelection.Options):
        important_ratio: float = option(0.5, "share of each image's keep chosen by importance (VisPruner's r)")
        step: int = option(DEDUP_STEP, "duplicates removed per matching round, at most")

        def __post_init__(self):
            if not 0.0 <= self.important_ratio <= 1.0:
                raise ValueError(f"important_ratio must lie in [0, 1], got {self.important_ratio}")
            if self.step < 1:
                raise ValueError(f"step must be >= 1, got {self.step}")

    def select(self, ctx, sample, tokens, keep):
        important = int(keep * self.options.important_ratio)
        return importance_then_diversity(self._importance[sample, tokens], self._features[sample, tokens], keep,
                                         important, self.options.step)


@register
class CDPruner(PerImageSelection):
    """CDPruner (Zhang et al., NeurIPS 2025; `Theia-4869/CDPruner`, `llava/model/llava_arch.py`): per image, the
    greedy MAP of a conditional DPP with kernel diag(r) S diag(r) (`selection.conditional_dpp`), S the cosine of
    the projected visual tokens (the decoder input embeddings), r their instruction relevance.

    Relevance. The released LLaVA code embeds the question with CLIP's text tower and the patches with CLIP's
    visual projection, and takes r = minmax(-mean_text cos) (negated: CLIP's patch-text similarities run
    backwards). visroute loads no CLIP text tower (the HF checkpoints carry none and nothing is downloaded), so
    here r = minmax(mean_text cos(e_v, e_t)) between the decoder input embeddings of the visual tokens and of the
    instruction tokens (the prompt after the last visual token), as OpenVINO GenAI's CDPruner does for non-CLIP
    models (`use_negative_relevance = false`); `negate` flips the sign. The min-max runs over the sample's
    candidate visual tokens (the released code: over the whole batch, so a sample's picks depend on its
    neighbours). `theta` enables the released code's commented-out option r <- exp(theta / (2 (1 - theta)) r).

    Departures: the relevance signal (above); the instruction tokens include the chat template's tail (the
    released code embeds the bare question); when k exceeds the rank of the features the greedy continues by
    relevance (the released code picks by NaN there)."""

    name = "cdpruner"
    description = "CDPruner: conditional DPP (relevance-weighted cosine kernel, greedy MAP) over the projected tokens"

    @dataclass(frozen=True)
    class Options:
        negate: bool = option(False, "negate the relevance (the released code's convention for CLIP embeddings)")
        theta: float | None = option(None, "relevance weight theta in (0, 1): r <- exp(theta / (2 (1 - theta)) r); "
                                           "None = r as is (the released default)")

        def __post_init__(self):
            if self.theta is not None and not 0.0 < self.theta < 1.0:
                raise ValueError(f"theta must lie in (0, 1), got {self.theta}")

    def prepare(self, ctx):
        valid = ctx.layout.valid
        device = valid.device
        embeds = ctx.inputs_embeds.float()
        self._features = gather_rows(embeds, ctx.layout.positions).to(device)
        text = ctx.query_text_mask.to(embeds.device)
        candidates = ctx.candidates.to(device) & valid
        self._relevance = torch.zeros(valid.shape, dtype=torch.float32, device=device)
        for s in range(valid.shape[0]):
            if not candidates[s].any():
                continue
            rel = cdpruner_relevance(self._features[s, candidates[s]], embeds[s, text[s]].to(device),
                                     self.options.negate)
            if self.options.theta is not None:
                rel = torch.exp(self.options.theta / (2 * (1 - self.options.theta)) * rel)
            self._relevance[s, candidates[s]] = rel

    def select(self, ctx, sample, tokens, keep):
        return conditional_dpp(self._features[sample, tokens], self._relevance[sample, tokens], keep)


@register
class HoloV(TowerSelection):
    """HoloV (Zou et al., NeurIPS 2025; `obananas/HoloV`, `llava/model/utils.py`, `qwen-model-HoloV/utils.py`):
    per image, its tokens in token order cut into `crops` contiguous runs, each run given a quota in proportion
    to its mean holistic score (scaled attention + `beta` x scaled similarity variance of the projected tokens),
    each run keeping its quota by attention (`selection.region_quotas`). Attention: LLaVA, the tower's [CLS]
    attention at `attentions[-2]` (mean over heads); Qwen2.5-VL, the mean attention a token receives at the last
    ViT block (the default layer on Qwen).

    Departures: `crops` defaults to the Qwen code's rule max(1, int(1024/576 x N / k)) on every family (the LLaVA
    code fixes 16 crops and k = 64; the rule gives 16 there); the kept tokens keep their positions (the released
    code concatenates them crop by crop, each crop by attention); on Qwen the scores are in token order (the
    released code leaves them in the ViT's window order while the tokens are in token order); quotas above a
    run's size leave a shortfall that is filled by attention (the released code pads with zero vectors)."""

    name = "holov"
    description = "HoloV: per-crop quotas by attention + similarity variance, top attention inside each crop"

    @dataclass(frozen=True)
    class Options(TowerSelection.Options):
        crops: int | None = option(None, "contiguous runs per image; None = max(1, int(1024/576 x N / k))")
        alpha: float = option(1.0, "weight of the scaled attention in the token score")
        beta: float = option(HOLOV_BETA, "weight of the scaled similarity variance in the token score")
        power: float = option(1.0, "exponent of the crop scores before normalising them into quotas")

        def __post_init__(self):
            if self.crops is not None and self.crops < 1:
                raise ValueError(f"crops must be >= 1, got {self.crops}")

    def select(self, ctx, sample, tokens, keep):
        o = self.options
        crops = o.crops if o.crops is not None else holov_crops(tokens.numel(), keep)
        return region_quotas(self._importance[sample, tokens], self._features[sample, tokens], keep, crops,
                             o.alpha, o.beta, o.power)


@register
class Scope(TowerSelection):
    """SCOPE (Deng et al., NeurIPS 2025; `kinredon/SCOPE`, `scope/clip_encoder.py`): per image, greedy
    saliency x coverage gain (`selection.saliency_coverage`) with the tower's [CLS] attention summed over heads at
    `attentions[-2]` as saliency (raised to `alpha`, the code's ALPHA, default 1) and the cosine of the tower
    features (`hidden_states[-2]`, the projector's input) as similarity.

    Departures: fp32 (the released code computes the gains in the tower's dtype, fp16); a LLaVA-NeXT image's
    keep is split over its tiles in proportion to their tokens (the released code gives each tile k / tiles)."""

    name = "scope"
    description = "SCOPE: greedy saliency ([CLS] attention) x facility-location coverage gain over tower features"
    tower_features = True

    @dataclass(frozen=True)
    class Options(TowerSelection.Options):
        alpha: float = option(1.0, "exponent of the saliency")
        combine: str = option("multi", "how saliency and coverage gain combine", choices=("multi", "add"))

    def select(self, ctx, sample, tokens, keep):
        o = self.options
        return saliency_coverage(self._importance[sample, tokens], self._features[sample, tokens], keep, o.alpha,
                                 o.combine)


__all__ = ["CDPruner", "HoloV", "PerImageSelection", "Scope", "TowerSelection", "VisPruner"]

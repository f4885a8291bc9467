"""The quality the testbed model must reach to ship, and the check that a checkpoint reaches it
(`visroute testbed bars`).

On held-out items, greedy:
- unrouted accuracy per family at least `UNROUTED_BARS` (boxes correct at IoU >= 0.5);
- the blind control (the image removed) within `BLIND_MARGIN` of the majority rate of every vision family (the
  model answers from the image, not from the question's words), and the blind-solvable family at its bar;
- the visual tokens are learned, not dictated (`alignment_checks`): object tokens are not the sums of their
  colour and shape word embeddings, background tokens are not one vector;
- the instrument discriminates: with one prune stage at layer `LAYER` keeping `KEEP` visual tokens, the oracle
  (the tokens of every hop: the objects the question names and the ones the answer is about) loses at most
  `ORACLE_LOSS` on every family, and random selection loses at least `RANDOM_LOSS` on the multi-hop families:
  the model still reads those tokens after its first layers.
Beside them, without a bar: the oracle that also keeps the tokens bordering each relevant one ("oracle+border",
`with_bordering_tokens`), the tokens a box answer needs on the testbed model (TRAINING.md); and, since the oracle
cannot keep what does not fit in `KEEP` tokens, the share of items whose relevant tokens it could not all keep
("over budget") and its loss on the other items ("oracle loss, fits"). The oracle keeps `KEEP` tokens: where an
item's relevant tokens are fewer, the rest are the first tokens of the image (ties keep their order), mostly
background. `exact_oracle` keeps each item's relevant tokens and nothing else ("oracle exact"), and with up to
`KEEP` blank tokens from before every object ("exact+blank before": the decoder reads the image causally, so
they hold nothing about the objects) or from after them ("exact+blank after": they may have read them). Where
the blank tokens from before help as much as those from after, the oracle's loss is the context the model was
trained with (how many tokens its attention spreads over), not missing information.

Each check carries a 95% percentile-bootstrap interval over the set's items of its family (paired for the losses:
the same items resampled for both configs). A bar inside a check's interval is decided by which items were drawn
as much as by the model: a larger set, or other item seeds, decide it (TRAINING.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from visroute.evaluation.metrics import bootstrap_ci, paired_bootstrap_diff
from visroute.testbed.questions import FAMILIES, MULTI_HOP_FAMILIES, VISION_FAMILIES

if TYPE_CHECKING:
    from visroute.testbed.evaluate import ItemResult

UNROUTED_BARS = {
    "attribute": 0.95, "existence": 0.95, "counting": 0.75, "relation": 0.85, "grounding": 0.80,
    "blind_solvable": 0.95, "relation_attribute": 0.80, "same_attribute": 0.80, "relation_grounding": 0.70,
}
BLIND_MARGIN = 0.10
LAYER, KEEP = 3, 8
ORACLE_LOSS = 0.05
RANDOM_LOSS = 0.20
# Set before the v3 models trained (`token_alignment`, on world-3 items): a model's object tokens are no closer to
# the sum of their own colour and shape word embeddings than to another colour's by more than ALIGNMENT_GAP (the
# v2 model: about 0.4), and its background tokens at one grid position in two images have a mean cosine of at
# most BACKGROUND_COS (v2: about 0.97).
ALIGNMENT_GAP = 0.15
BACKGROUND_COS = 0.90


@dataclass
class Check:
    """One bar: what is measured, the value, the bar, whether it is met, and the value's 95% bootstrap interval
    over the items (None for the construction bars, which are not accuracies)."""

    family: str
    what: str
    value: float
    bar: str
    met: bool
    interval: tuple[float, float] | None = None

    @property
    def bar_inside_interval(self) -> bool:
        """Whether the bar's threshold lies within the interval: the items drawn decide the check."""
        if self.interval is None:
            return False
        threshold = float(self.bar.split()[-1].lstrip("+-"))  # ">= 0.95", "<= 0.05", "within +-0.10"
        if self.what == "blind - majority":
            return any(self.interval[0] <= t <= self.interval[1] for t in (-threshold, threshold))
        return self.interval[0] <= threshold <= self.interval[1]


def check_bars(evaluator, layer: int = LAYER, keep: int = KEEP) -> tuple[list[Check], dict[str, dict[str, float]]]:
    """Run the unrouted model, the blind control, and the oracle and random at one prune stage (`layer`,
    `keep`) on the evaluator's items; returns every check and the accuracies per config and family (with the
    majority rates under "majority"; without a bar: "oracle+border", the oracle on `with_bordering_tokens`, and
    `exact_oracle` on the items, alone ("oracle exact") and with up to `keep` blank tokens before or after every
    object ("exact+blank before", "exact+blank after", `with_blank_context`))."""
    from visroute import RoutingConfig, Stage
    from visroute.testbed.data import with_blank_context, with_bordering_tokens
    from visroute.testbed.evaluate import majority_rates

    oracle = RoutingConfig("prune", "oracle", [Stage(layer, keep)])
    bordered = evaluator.on([with_bordering_tokens(it) for it in evaluator.items])
    unrouted, oracle_run = evaluator.run(None, name="unrouted"), evaluator.run(oracle, name="oracle")
    blind = evaluator.run(None, blind=True, name="blind")
    random_run = evaluator.run(RoutingConfig("prune", "random", [Stage(layer, keep)]), name="random")
    acc = {
        "unrouted": unrouted.accuracy(),
        "blind": blind.accuracy(),
        "oracle": oracle_run.accuracy(),
        "random": random_run.accuracy(),
        "oracle+border": bordered.run(oracle, name="oracle+border").accuracy(),
        "oracle exact": exact_oracle(evaluator, evaluator.items, layer),
        "exact+blank before": exact_oracle(evaluator, [with_blank_context(it, keep) for it in evaluator.items],
                                           layer),
        "exact+blank after": exact_oracle(evaluator, [with_blank_context(it, keep, "after")
                                                      for it in evaluator.items], layer),
        "majority": majority_rates(evaluator.items),
        **split_by_budget(unrouted.results, oracle_run.results),
    }
    right = {name: _correct_by_family(report.results) for name, report in
             (("unrouted", unrouted), ("blind", blind), ("oracle", oracle_run), ("random", random_run))}
    checks = []
    for fam in FAMILIES:
        if fam not in acc["unrouted"]:
            continue
        u = acc["unrouted"][fam]
        checks.append(Check(fam, "unrouted", u, f">= {UNROUTED_BARS[fam]:.2f}", u >= UNROUTED_BARS[fam],
                            bootstrap_ci(right["unrouted"][fam])))
        blind_ci = bootstrap_ci(right["blind"][fam])
        gap = acc["blind"][fam] - acc["majority"][fam]
        if fam in VISION_FAMILIES:
            checks.append(Check(fam, "blind - majority", gap, f"within +-{BLIND_MARGIN:.2f}",
                                abs(gap) <= BLIND_MARGIN + 1e-9,
                                (blind_ci[0] - acc["majority"][fam], blind_ci[1] - acc["majority"][fam])))
        else:
            b = acc["blind"][fam]
            checks.append(Check(fam, "blind", b, f">= {UNROUTED_BARS[fam]:.2f}", b >= UNROUTED_BARS[fam], blind_ci))
            continue
        loss = u - acc["oracle"][fam]
        checks.append(Check(fam, f"oracle loss @L{layer}:{keep}", loss, f"<= {ORACLE_LOSS:.2f}",
                            loss <= ORACLE_LOSS + 1e-9,
                            paired_bootstrap_diff(right["unrouted"][fam], right["oracle"][fam])[1:]))
        if fam in MULTI_HOP_FAMILIES:
            loss = u - acc["random"][fam]
            checks.append(Check(fam, f"random loss @L{layer}:{keep}", loss, f">= {RANDOM_LOSS:.2f}",
                                loss >= RANDOM_LOSS - 1e-9,
                                paired_bootstrap_diff(right["unrouted"][fam], right["random"][fam])[1:]))
    return checks + alignment_checks(evaluator.model, evaluator.items), acc


def _correct_by_family(results: list[ItemResult]) -> dict[str, list[float]]:
    """Per family, 1.0 or 0.0 for each item, ordered by item id, so two runs of the same items pair up."""
    out: dict[str, list[float]] = {}
    for r in sorted(results, key=lambda r: r.id):
        out.setdefault(r.family, []).append(float(r.correct))
    return out


def exact_oracle(evaluator, items, layer: int = LAYER) -> dict[str, float]:
    """Accuracy per family (and "all") of the oracle at one prune stage at `layer` keeping exactly each item's
    relevant tokens (the union of its hops), no more (an item without any keeps one token, the image's first: a
    stage keeps at least one): items are run in groups of equal count, each group at a keep of that count."""
    from visroute import RoutingConfig, Stage
    from visroute.testbed.evaluate import EvalReport

    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(max(1, len(set(it.relevant_tokens))), []).append(it)
    results = []
    for n, group in sorted(groups.items()):
        results += evaluator.on(group).run(RoutingConfig("prune", "oracle", [Stage(layer, n)]),
                                           name=f"oracle exact {n}").results
    return EvalReport("oracle exact", None, False, results, [layer], 0, 0.0).accuracy()


def alignment_checks(model, items) -> list[Check]:
    """The two construction bars on `items`' images (`token_alignment`): object tokens not word-embedding sums
    (own minus other colour's cosine at most ALIGNMENT_GAP), background tokens not one vector (mean cosine at one
    grid position across images at most BACKGROUND_COS)."""
    got = token_alignment(model, items)
    gap = got["own_cos"] - got["other_cos"]
    return [Check("visual tokens", "own - other word-sum cosine", gap, f"<= {ALIGNMENT_GAP:.2f}",
                  gap <= ALIGNMENT_GAP),
            Check("visual tokens", "background cosine", got["background_cos"], f"<= {BACKGROUND_COS:.2f}",
                  got["background_cos"] <= BACKGROUND_COS)]


def split_by_budget(unrouted: list[ItemResult], oracle: list[ItemResult]) -> dict[str, dict[str, float]]:
    """Per family, from the per-item results of the same items unrouted and under the oracle: "over budget", the
    share of items whose relevant tokens the oracle did not all keep (retention recall below 1 in some stage), and
    "oracle loss, fits", the oracle's loss on the other items (absent where there are none)."""
    over: dict[str, list[bool]] = {}
    kept: dict[str, list[float]] = {}
    by_id = {o.id: o for o in oracle}
    for u in unrouted:
        o = by_id[u.id]
        fits = all(r is None or r >= 1 - 1e-9 for r in o.recall)
        over.setdefault(u.family, []).append(not fits)
        if fits:
            kept.setdefault(u.family, []).append(float(u.correct) - float(o.correct))
    return {"over budget": {f: sum(v) / len(v) for f, v in over.items()},
            "oracle loss, fits": {f: sum(v) / len(v) for f, v in kept.items()}}


def format_bars(checks: list[Check], acc: dict[str, dict[str, float]], n_items: int) -> str:
    """A Markdown table per family (accuracy of each config, majority rate, the oracle split by budget) and the
    list of checks."""
    cols = ["unrouted", "blind", "majority", "oracle", "random", "oracle+border", "oracle exact",
            "exact+blank before", "exact+blank after", "over budget", "oracle loss, fits"]
    lines = [f"{n_items} held-out items", "", "| family | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for fam in FAMILIES:
        if fam in acc["unrouted"]:
            cells = (f"{acc[c][fam]:.3f}" if fam in acc[c] else "-" for c in cols)
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "| family | check | value | 95% interval | bar | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        signed = c.what not in ("unrouted", "blind", "background cosine")
        value = f"{c.value:+.3f}" if signed else f"{c.value:.3f}"
        interval = "-" if c.interval is None else (f"{c.interval[0]:+.2f} .. {c.interval[1]:+.2f}" if signed
                                                   else f"{c.interval[0]:.2f} .. {c.interval[1]:.2f}")
        lines.append(f"| {c.family} | {c.what} | {value} | {interval} | {c.bar} | {'yes' if c.met else '**no**'} |")
    missed = [c for c in checks if not c.met]
    close = [c for c in checks if c.bar_inside_interval]
    lines += ["", f"{len(checks) - len(missed)} of {len(checks)} checks met"
              + ("" if not missed else ": missed " + ", ".join(f"{c.family} {c.what}" for c in missed))]
    if close:
        lines.append(f"{len(close)} with the bar inside the 95% interval (the items drawn decide them): "
                     + ", ".join(f"{c.family} {c.what} ({'met' if c.met else 'missed'})" for c in close))
    return "\n".join(lines)


def token_alignment(model, items) -> dict[str, float]:
    """How much a model's visual tokens (its projector outputs) look like word embeddings, and how alike its
    background tokens are, on `items` (their images):

    - `own_cos`: mean cosine between an object patch's token and the sum of the decoder's input embeddings of its
      colour and shape words; `other_cos`: the same with another colour's word in place of its own (a model whose
      tokens were trained to be these sums scores high on the first and clearly lower on the second);
    - `background_cos`: mean cosine between the background tokens (patches that show no object and no
      distractor) at the same grid position in two different images: near 1 when every background patch is one
      vector plus its place, lower when background tokens carry content.
    Patches are those where objects show (`scenes.visible_tokens`); world-3 distractors are left out."""
    import torch

    from visroute.testbed.modeling import VOCAB, pixel_values
    from visroute.testbed.data import blank_tokens
    from visroute.testbed.scenes import COLORS, visible_tokens

    embed = model.get_input_embeddings().weight.detach().float()
    word = {w: embed[VOCAB.index(w)] for w in VOCAB}
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values([it.image() for it in items]),
                                               vision_feature_layer=-1, vision_feature_select_strategy="default")
        tokens = torch.stack(list(feats.pooler_output)).float()
    cos = torch.nn.functional.cosine_similarity
    own, other, background = [], [], []
    for n, it in enumerate(items):
        for i, o in enumerate(it.objects):
            if o.color not in COLORS:
                continue  # prior shapes: every one of them has a single colour
            wrong = next(c for c in sorted(COLORS) if c != o.color)
            for t in visible_tokens(it.objects, i):
                own.append(float(cos(tokens[n, t], word[o.color] + word[o.shape], dim=0)))
                other.append(float(cos(tokens[n, t], word[wrong] + word[o.shape], dim=0)))
        background.append(set(blank_tokens(it)))
    pairs = []
    for n in range(len(items) - 1):
        common = sorted(background[n] & background[n + 1])
        if common:
            pairs.append(float(cos(tokens[n, common], tokens[n + 1, common], dim=-1).mean()))
    return {"own_cos": sum(own) / len(own), "other_cos": sum(other) / len(other),
            "background_cos": sum(pairs) / len(pairs)}


def random_by_layer(evaluator, keep: int = KEEP, layers: list[int] | None = None) -> dict[int, dict[str, float]]:
    """Accuracy per family with one random prune stage keeping `keep` visual tokens, at each of `layers` (default:
    every decoder layer): where a model's reading of its image jumps from one layer to the next, any claim about
    "which layer" is fragile (`visroute testbed layers`)."""
    from visroute import RoutingConfig, Stage

    depth = evaluator.model.config.get_text_config().num_hidden_layers
    out = {}
    for layer in layers if layers is not None else range(depth):
        if not 0 <= layer < depth:
            raise ValueError(f"layer {layer} is not one of the model's 0..{depth - 1}")
        config = RoutingConfig("prune", "random", [Stage(layer, keep)])
        out[layer] = evaluator.run(config, name=f"random @L{layer}:{keep}").accuracy()
    return out


def format_layers(acc: dict[int, dict[str, float]], keep: int) -> str:
    """A Markdown table: one row per layer, one column per family."""
    fams = [f for f in FAMILIES if any(f in a for a in acc.values())]
    lines = [f"random selection, one prune stage keeping {keep} visual tokens", "",
             "| layer | " + " | ".join(fams) + " | all |", "|---|" + "---|" * (len(fams) + 1)]
    for layer, a in acc.items():
        lines.append(f"| {layer} | " + " | ".join(f"{a.get(f, float('nan')):.3f}" for f in fams)
                     + f" | {a['all']:.3f} |")
    return "\n".join(lines)

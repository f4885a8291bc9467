"""The scorer contract, run over every registered scorer x action x family of the family table (no hand-kept
list of scorers: a newly registered scorer gets every check by registering).

Each scorer must
* return finite (B, Nv) scores at the candidates, and the engine must keep exactly the top of them: never a
  non-candidate (under prune, a token dropped at one stage is never selected later; padding never);
* give each sample of a padded batch what it gets alone (docs/DESIGN.md rule 5: the same selections and the
  same text-token logits);
* give the unmodified model's logits under a keep-all schedule (rule 1);
* when it declares `before_decoder`, drop tokens before layer 0: the first decoder layer only runs the kept ones.

Scorers that declare per-call inputs get them made up here (a random `relevance` per visual token); a scorer
that needs inputs this suite cannot make up is skipped, saying which."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from conftest import EVERY, family
from visroute import RoutingConfig, Stage, apply_routing
from visroute.scoring import Scorer, _REGISTRY, available_scorers, register
from visroute.tensors import gather_rows

ACTIONS = ("prune", "reroute")
SCHEDULE = [Stage(1, 0.5), Stage(3, 0.25)]  # under prune, the second stage chooses among the first one's tokens
KEEP_ALL = [Stage(1, 1.0), Stage(3, 10_000)]


def _relevance(counts: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) for n in counts]


# Per-call inputs the suite can make up, from the samples' visual-token counts: one list entry per sample, so
# that a sample alone gets its own entry.
MADE_UP = {"relevance": _relevance}


@dataclass(frozen=True)
class Case:
    scorer: str
    action: str
    family: str

    def __str__(self) -> str:
        return f"{self.scorer}-{self.action}-{self.family}"


def contract_cases(before_decoder_only: bool = False) -> list[Case]:
    """Every registered scorer x action x family (the registry read now)."""
    return [Case(name, action, fam) for name, cls in available_scorers().items()
            if cls.before_decoder or not before_decoder_only for action in ACTIONS for fam in EVERY]


def _per_call_inputs(scorer: str, inputs, image_token_id: int) -> list[dict[str, Any]]:
    """Per sample, the made-up per-call inputs the scorer declares (skips the test when it needs others)."""
    needs = tuple(available_scorers()[scorer].call_inputs)
    missing = [n for n in needs if n not in MADE_UP]
    if missing:
        pytest.skip(f"scorer {scorer!r} needs per-call inputs {missing} that the contract suite cannot make up")
    counts = inputs["input_ids"].eq(image_token_id).sum(1).tolist()
    made = {n: MADE_UP[n](counts, seed=7) for n in needs}
    return [{n: v[i] for n, v in made.items()} for i in range(len(counts))]


def _batched(per_sample: list[dict[str, Any]], rows: list[int]) -> dict[str, Any]:
    names = per_sample[0].keys() if per_sample else ()
    return {n: [per_sample[r][n] for r in rows] for n in names}


def routed(fam, scorer: str, action: str, stages, inputs, extras):
    """(logits, record) of a routed forward. Each sample is numbered from 0 as `generate` does: a score that
    depends on absolute positions (DART's key norms) then does not depend on the padding."""
    cfg = RoutingConfig(action=action, scorer=scorer, stages=stages)
    with apply_routing(fam.model, cfg) as router, router.call_options(**extras), torch.no_grad():
        logits = fam.model(**inputs, **fam.row.padded_positions(inputs)).logits
    return logits, router.last_record


def _counts(inputs, fam) -> list[int]:
    return inputs["input_ids"].eq(fam.image_token_id).sum(1).tolist()


# ---- the checks (each an assertion over one case) -------------------------------------------------------------
def check_scores_and_selection(case: Case) -> None:
    fam = family(case.family)
    inputs = fam.batch()
    per_sample = _per_call_inputs(case.scorer, inputs, fam.image_token_id)
    _, rec = routed(fam, case.scorer, case.action, SCHEDULE, inputs, _batched(per_sample, [0, 1, 2]))
    counts = _counts(inputs, fam)
    b, nv = len(counts), max(counts)
    real = torch.arange(nv)[None, :] < torch.tensor(counts)[:, None]  # (B, Nv) real visual tokens
    candidates = real
    assert len(rec.stages) == len(SCHEDULE)
    for stage, st in zip(SCHEDULE, rec.stages):
        assert st.scores is not None and tuple(st.scores.shape) == (b, nv), case
        assert torch.isfinite(st.scores[candidates]).all(), f"{case}: non-finite scores at candidates"
        assert tuple(st.active.shape) == (b, nv)
        assert not (st.active & ~candidates).any(), f"{case}: a non-candidate (or padding) was selected"
        for i, n in enumerate(counts):
            want = stage.keep if isinstance(stage.keep, int) else int(stage.keep * n)
            assert int(st.active[i].sum()) == min(want, int(candidates[i].sum())), case
            # the kept tokens are the top of the scores among the candidates (ties either way)
            kept, dropped = st.active[i], candidates[i] & ~st.active[i]
            if kept.any() and dropped.any():
                assert st.scores[i][kept].min() >= st.scores[i][dropped].max(), f"{case}: not the top scores"
        candidates = st.active if case.action == "prune" else real


def check_padded_batch_equals_alone(case: Case) -> None:
    fam = family(case.family)
    inputs = fam.batch()
    per_sample = _per_call_inputs(case.scorer, inputs, fam.image_token_id)
    logits, rec = routed(fam, case.scorer, case.action, SCHEDULE, inputs, _batched(per_sample, [0, 1, 2]))
    text = inputs["attention_mask"].bool() & inputs["input_ids"].ne(fam.image_token_id)
    for i in range(inputs["input_ids"].shape[0]):
        alone = fam.single(i)
        logits_i, rec_i = routed(fam, case.scorer, case.action, SCHEDULE, alone, _batched(per_sample, [i]))
        for s, (st, st_i) in enumerate(zip(rec.stages, rec_i.stages)):
            assert torch.equal(st.selected[i], st_i.selected[0]), f"{case}: sample {i}, stage {s} selects otherwise"
        text_i = alone["attention_mask"][0].bool() & alone["input_ids"][0].ne(fam.image_token_id)
        torch.testing.assert_close(logits[i][text[i]], logits_i[0][text_i], atol=5e-5, rtol=1e-4)


_UNROUTED: dict[str, torch.Tensor] = {}


def _unrouted_logits(fam, inputs) -> torch.Tensor:
    if fam.name not in _UNROUTED:
        with torch.no_grad():
            _UNROUTED[fam.name] = fam.model(**inputs, **fam.row.padded_positions(inputs)).logits
    return _UNROUTED[fam.name]


def check_keep_all_equals_unmodified(case: Case) -> None:
    fam = family(case.family)
    inputs = fam.batch()
    per_sample = _per_call_inputs(case.scorer, inputs, fam.image_token_id)
    stages = ([Stage(0, 1.0)] if available_scorers()[case.scorer].before_decoder else []) + KEEP_ALL
    logits, rec = routed(fam, case.scorer, case.action, stages, inputs, _batched(per_sample, [0, 1, 2]))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], _unrouted_logits(fam, inputs)[valid], atol=2e-5, rtol=1e-5)
    for st in rec.stages:
        assert torch.equal(st.kept, rec.num_visual), case


def check_before_decoder_drops_before_layer_0(case: Case) -> None:
    fam = family(case.family)
    inputs = fam.batch()
    per_sample = _per_call_inputs(case.scorer, inputs, fam.image_token_id)
    keep = 3
    counts = torch.tensor(_counts(inputs, fam))
    assert (counts > keep).all()
    text = (inputs["attention_mask"].bool() & inputs["input_ids"].ne(fam.image_token_id)).sum(1)
    seen = []

    def note(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape)

    hook = fam.model.model.language_model.layers[0].register_forward_pre_hook(note, with_kwargs=True)
    try:
        _, rec = routed(fam, case.scorer, case.action, [Stage(0, keep)], inputs, _batched(per_sample, [0, 1, 2]))
    finally:
        hook.remove()
    # the first decoder layer ran once, on the compact sequence of text + kept tokens, in every sample
    assert [s[1] for s in seen] == [int((text + keep).max())], case
    assert rec.active_visual.eq(keep).all() and torch.equal(rec.active_tokens[0], text + keep)


CHECKS = (check_scores_and_selection, check_padded_batch_equals_alone, check_keep_all_equals_unmodified)


# ---- the suite over the registry ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", contract_cases(), ids=str)
def test_scores_are_finite_and_the_top_candidates_are_kept(case):
    check_scores_and_selection(case)


@pytest.mark.parametrize("case", contract_cases(), ids=str)
def test_padded_batch_equals_each_sample_alone(case):
    check_padded_batch_equals_alone(case)


@pytest.mark.parametrize("case", contract_cases(), ids=str)
def test_keep_all_equals_the_unmodified_model(case):
    check_keep_all_equals_unmodified(case)


@pytest.mark.parametrize("case", contract_cases(before_decoder_only=True), ids=str)
def test_before_decoder_scorers_drop_tokens_before_layer_0(case):
    check_before_decoder_drops_before_layer_0(case)


def test_every_family_and_scorer_is_covered():
    names = {c.scorer for c in contract_cases()}
    assert names == set(available_scorers()) and len(names) >= 10
    assert {c.family for c in contract_cases()} == set(EVERY)
    assert {c.scorer for c in contract_cases(before_decoder_only=True)} == {
        n for n, cls in available_scorers().items() if cls.before_decoder}


# ---- a scorer registered now gets the whole suite -------------------------------------------------------------
@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield register
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _hidden_norm(ctx) -> torch.Tensor:
    return gather_rows(ctx.hidden, ctx.layout.positions).float().norm(dim=-1)  # (B, Nv)


def test_a_newly_registered_scorer_gets_every_check(scratch_registry):
    @scratch_registry
    class Throwaway(Scorer):
        """The 1-norm of each visual token's hidden state entering the stage's layer."""

        name = "contract_throwaway"
        description = "test scorer"
        before_decoder = True

        def score(self, ctx):
            return _hidden_norm(ctx)

    cases = [c for c in contract_cases(before_decoder_only=True) if c.scorer == "contract_throwaway"]
    assert len(cases) == len(ACTIONS) * len(EVERY)
    for case in cases:
        for check in CHECKS + (check_before_decoder_drops_before_layer_0,):
            check(case)


def test_the_checks_catch_a_broken_scorer(scratch_registry):
    """Scores that depend on the rest of the batch break rule 5; infinite scores are caught too."""

    @scratch_registry
    class BatchDependent(Scorer):
        name = "contract_batch_dependent"
        description = "test scorer"

        def score(self, ctx):
            own = _hidden_norm(ctx)
            return own.roll(1, dims=0) if own.shape[0] > 1 else own  # sample i scored with sample i-1's norms

    @scratch_registry
    class Infinite(Scorer):
        name = "contract_infinite"
        description = "test scorer"

        def score(self, ctx):
            return _hidden_norm(ctx).masked_fill(ctx.layout.positions % 2 == 0, float("inf"))

    for fam in ("llava", "qwen2.5"):
        with pytest.raises(AssertionError, match="selects otherwise"):
            check_padded_batch_equals_alone(Case("contract_batch_dependent", "prune", fam))
        with pytest.raises(AssertionError, match="non-finite"):
            check_scores_and_selection(Case("contract_infinite", "reroute", fam))


def test_a_scorer_needing_inputs_the_suite_cannot_make_up_is_skipped_saying_so(scratch_registry):
    @scratch_registry
    class NeedsBoxes(Scorer):
        name = "contract_needs_boxes"
        description = "test scorer"
        call_inputs = ("relevance", "boxes")

        def score(self, ctx):
            raise AssertionError("not reached")

    for check in CHECKS:
        with pytest.raises(pytest.skip.Exception, match=r"'contract_needs_boxes' needs per-call inputs \['boxes'\]"):
            check(Case("contract_needs_boxes", "prune", "llava"))

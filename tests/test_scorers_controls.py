"""The controls (random, uniform, oracle) and the scorer listing. (Pruning before the decoder, for every scorer that
declares it, is part of the contract suite: test_contract.py.)"""

import pytest
import torch

from conftest import PROMPTS
from visroute import RoutingConfig, Stage, apply_routing
from visroute.scoring import available_scorers
from visroute.scoring.controls import lattice_scores, split_budget


def _run(fam, scorer, stages, inputs=None, action="prune", relevance=None, **options):
    inputs = fam.batch(PROMPTS[:2]) if inputs is None else inputs
    cfg = RoutingConfig(action=action, scorer=scorer, stages=stages, scorer_options=options)
    with apply_routing(fam.model, cfg) as router, torch.no_grad():
        if relevance is None:
            fam.model(**inputs)
        else:
            with router.call_options(relevance=relevance):
                fam.model(**inputs)
    return router.last_record


def _counts(record):
    return record.num_visual.tolist()


# ---- uniform ----------------------------------------------------------------------------------------------------
def _cells(n_rows, n_cols, keep):
    top = lattice_scores(n_rows, n_cols, keep).topk(keep).indices
    return sorted(top.tolist())


def test_lattice_is_an_even_stride_over_the_grid():
    # 24x24 keeping 144: every second row and column, at the centre of each 2x2 stride
    cells = _cells(24, 24, 144)
    assert {c // 24 for c in cells} == set(range(1, 24, 2)) and {c % 24 for c in cells} == set(range(1, 24, 2))
    # 24x24 keeping 64: an 8x8 lattice at the centres of 3-cell strides
    cells = _cells(24, 24, 64)
    assert {c // 24 for c in cells} == set(range(1, 24, 3)) and {c % 24 for c in cells} == set(range(1, 24, 3))
    # a wide grid keeps a wide lattice
    cells = _cells(6, 24, 16)
    assert {c // 24 for c in cells} == {1, 4} and {c % 24 for c in cells} == set(range(1, 24, 3))


def test_lattice_with_more_points_than_the_budget_drops_evenly():
    # 6x6 keeping 8: a 3x3 lattice (rows and cols 1, 3, 5) of which the strided 8 of 9 skip the middle one
    lattice = {r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)}
    assert _cells(6, 6, 8) == sorted(lattice - {3 * 6 + 3})


def test_split_budget_is_proportional_and_exact():
    assert split_budget(8, [16, 16]) == [4, 4]
    assert split_budget(5, [10, 30]) == [1, 4]
    assert split_budget(7, [1, 1, 1]) == [1, 1, 1]
    assert sum(split_budget(13, [5, 7, 11])) == 13


def test_uniform_keeps_the_stride_centres_of_each_image(fam):
    record = _run(fam, "uniform", [Stage(0, 0.25)])
    selected = [s.tolist() for s in record.stages[0].selected]
    if fam.name == "llava":  # 4x4 grids: sample 0 one image, sample 1 two
        assert selected == [[5, 7, 13, 15], [5, 7, 13, 15, 21, 23, 29, 31]]
    else:  # Qwen: a 4x4 grid; then a 2x4 and a 4x2 grid (offset 8)
        assert selected == [[5, 7, 13, 15], [5, 7, 8 + 3, 8 + 7]]


def test_random_and_uniform_are_reproducible_and_differ(fam):
    picks = {}
    for scorer in ("random", "uniform"):
        runs = [_run(fam, scorer, [Stage(1, 0.25)]).stages[0].active for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        picks[scorer] = runs[0]
    assert not torch.equal(picks["random"], picks["uniform"])
    other_seed = _run(fam, "random", [Stage(1, 0.25)], seed=1).stages[0].active
    assert not torch.equal(other_seed, picks["random"])


# ---- oracle -----------------------------------------------------------------------------------------------------
def _marked(counts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].sort().values for n in counts]


@pytest.mark.parametrize("form", ["list", "tensor"])
def test_oracle_keeps_exactly_the_marked_tokens(fam, form):
    counts = _counts(_run(fam, "random", [Stage(1, 1.0)]))
    marked = _marked(counts, 5)
    rows = [torch.zeros(n).index_fill_(0, m, 1.0) for n, m in zip(counts, marked)]
    relevance = rows if form == "list" else torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    record = _run(fam, "oracle", [Stage(1, 5)], relevance=relevance)
    assert [s.tolist() for s in record.stages[0].selected] == [m.tolist() for m in marked]
    # a budget that covers the relevant tokens keeps all of them, whatever the ties among the rest
    record = _run(fam, "oracle", [Stage(1, 9)], relevance=relevance)
    for sel, m in zip(record.stages[0].selected, marked):
        assert set(m.tolist()) <= set(sel.tolist()) and len(sel) == 9


def test_oracle_refuses_missing_or_mismatched_relevance(fam):
    with pytest.raises(ValueError, match="call_options\\(relevance=R\\)"):
        _run(fam, "oracle", [Stage(1, 4)])
    counts = _counts(_run(fam, "random", [Stage(1, 1.0)]))
    with pytest.raises(ValueError, match="do not match"):
        _run(fam, "oracle", [Stage(1, 4)], relevance=[torch.ones(n + 1) for n in counts])
    with pytest.raises(ValueError, match="needs"):
        _run(fam, "oracle", [Stage(1, 4)], relevance=torch.ones(2, max(counts) + 3))


# ---- listing ----------------------------------------------------------------------------------------------------
def test_every_scorer_is_listed_with_its_description_and_options(capsys):
    from visroute.cli import main

    assert main(["scorers"]) == 0
    out = capsys.readouterr().out
    expected = {"last_token_attention", "text_attention", "vision_cls_attention", "embedding_similarity",
                "hidden_similarity", "duplication", "diversity", "random", "uniform", "oracle"}
    assert expected <= set(available_scorers())
    for name, cls in available_scorers().items():
        assert cls.description and cls.__doc__ and len(cls.__doc__) > 200, name
        assert f"{name:24s} {cls.description}" in out
        for spec in cls.option_specs():
            assert spec.help and f"{spec.name}={spec.default!r} ({spec.type}" in out and spec.help in out

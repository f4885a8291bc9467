"""The testbed's scene and question generator: determinism, relevance masks against the drawn pixels, answers
against the scene (read back from the image where the pixels allow it), and balanced answers."""

from __future__ import annotations

import random
from collections import Counter, deque

import numpy as np
import pytest

from visroute.testbed import DEFAULT_WORLD
from visroute.testbed.data import make_items, read_dataset
from visroute.testbed.questions import FAMILIES
from visroute.testbed.scenes import ALL_COLORS, GRID, PATCH, PRIOR_SHAPES, SHAPES, object_tokens, random_scene, render

N = 54  # six items of every family


@pytest.fixture(scope="module")
def items():
    return make_items(N, seed=11)


def test_same_seed_same_items_other_seed_other_items(items):
    again = make_items(N, seed=11)
    assert [a.to_dict() for a in items] == [b.to_dict() for b in again]
    assert all(a.hops == b.hops and a.hop_targets == b.hop_targets for a, b in zip(items, again))
    assert all(np.array_equal(np.asarray(a.image()), np.asarray(b.image())) for a, b in zip(items[:6], again[:6]))
    other = make_items(N, seed=12)
    assert sum(a.question == b.question and a.objects == b.objects for a, b in zip(items, other)) < N // 4
    assert [it.family for it in items] == [FAMILIES[i % len(FAMILIES)] for i in range(N)]


def test_make_command_is_deterministic(tmp_path):
    from visroute.cli import main

    for name in ("a", "b"):
        assert main(["testbed", "make", "--n", "12", "--seed", "5", "--out", str(tmp_path / name)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert len(pngs) == 12
    assert all((a / "images" / p).read_bytes() == (b / "images" / p).read_bytes() for p in pngs)
    loaded = read_dataset(a)
    fresh = make_items(12, seed=5, world=DEFAULT_WORLD)  # the command's default scene generator
    assert [x.to_dict("-") for x in loaded] == [y.to_dict("-") for y in fresh]
    assert np.array_equal(np.asarray(loaded[3].image()), np.asarray(fresh[3].image()))


def _patches_that_differ(img_a, img_b) -> set[int]:
    diff = (np.asarray(img_a).astype(int) != np.asarray(img_b).astype(int)).any(-1)
    return set(np.flatnonzero(diff.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3))).tolist())


def test_relevance_is_exactly_the_patches_the_target_objects_paint(items):
    for it in items:
        full = it.image()
        expected: set[int] = set()
        for k in it.targets:
            without = render([o for i, o in enumerate(it.objects) if i != k], it.background_seed)
            painted = _patches_that_differ(full, without)
            assert painted == set(object_tokens(it.objects[k])), (it.id, it.objects[k])
            expected |= painted
        assert it.relevant_tokens == sorted(expected), it.id
        assert it.relevance().sum() == len(expected)


def test_every_object_covers_one_to_four_tokens_and_objects_do_not_touch():
    rng = random.Random(0)
    for _ in range(40):
        objs = random_scene(rng)
        for o in objs:
            toks = object_tokens(o)
            assert 1 <= len(toks) <= 4
            assert all(o.x <= t % GRID < o.x + o.size and o.y <= t // GRID < o.y + o.size for t in toks)
        for i, p in enumerate(objs):
            for q in objs[i + 1:]:
                gap_x = max(q.x - (p.x + p.size), p.x - (q.x + q.size))
                gap_y = max(q.y - (p.y + p.size), p.y - (q.y + q.size))
                assert max(gap_x, gap_y) >= 1


def _segments(image) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Objects read back from the pixels alone: connected regions within 13 of a palette colour on every
    channel (objects are tinted by at most 12; the background is never that saturated or bright).
    Returns (colour, pixel box x0, y0, x1, y1 inclusive)."""
    arr = np.asarray(image).astype(int)
    found = []
    for name, rgb in ALL_COLORS.items():
        mask = (np.abs(arr - np.array(rgb)) <= 13).all(-1)
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            queue, pts = deque([(y, x)]), []
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                pts.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*pts)
            if len(pts) >= 12:  # smaller specks would be background noise; objects have dozens of pixels
                found.append((name, (min(xs), min(ys), max(xs), max(ys))))
    return found


def _patch_box(px_box) -> list[int]:
    x0, y0, x1, y1 = px_box
    return [x0 // PATCH, y0 // PATCH, x1 // PATCH + 1, y1 // PATCH + 1]


def _meta_answer(it) -> str:
    """The answer recomputed from the object list, written independently of the generator."""
    objs, q = it.objects, it.question.rstrip("?").split()
    if it.template == "color_of_shape":
        shape = q[-1]
        colours = {o.color for o in objs if o.shape == shape}
        return PRIOR_SHAPES[shape] if it.family == "blind_solvable" else colours.pop()
    if it.template == "shape_of_color":
        return next(o.shape for o in objs if o.color == q[-2])
    if it.template == "exists":
        return "yes" if any((o.color, o.shape) == (q[-2], q[-1]) for o in objs) else "no"
    if it.template == "count_shape":
        return str(sum(o.shape + ("es" if o.shape == "cross" else "s") == q[2] for o in objs))
    if it.template == "count_color":
        return str(sum(o.color == q[2] for o in objs))
    if it.template in ("left", "above"):
        a = next(o for o in objs if (o.color, o.shape) == (q[2], q[3]))
        b = next(o for o in objs if (o.color, o.shape) == (q[-2], q[-1]))
        if it.template == "left":
            return "yes" if a.x + a.size <= b.x else "no"
        return "yes" if a.y + a.size <= b.y else "no"
    if it.template == "where":
        o = next(o for o in objs if (o.color, o.shape) == (q[-2], q[-1]))
        return f"{o.x} {o.y} {o.x + o.size} {o.y + o.size}"
    if it.template.startswith("related_"):  # "... the object {left of|right of|above|below} the {c} {s}"
        a = next(o for o in objs if (o.color, o.shape) == (q[-2], q[-1]))
        side = q[q.index("object") + 1]
        rows = lambda o: set(range(o.y, o.y + o.size))  # noqa: E731
        cols = lambda o: set(range(o.x, o.x + o.size))  # noqa: E731
        found = [o for o in objs if o is not a and (
            (side == "left" and rows(o) & rows(a) and max(cols(o)) < min(cols(a)))
            or (side == "right" and rows(o) & rows(a) and min(cols(o)) > max(cols(a)))
            or (side == "above" and cols(o) & cols(a) and max(rows(o)) < min(rows(a)))
            or (side == "below" and cols(o) & cols(a) and min(rows(o)) > max(rows(a))))]
        assert len(found) == 1, (it.id, it.question)
        (b,) = found
        return {"related_color": b.color, "related_shape": b.shape,
                "related_where": f"{b.x} {b.y} {b.x + b.size} {b.y + b.size}"}[it.template]
    if it.template == "shape_of_same_color":
        (a,) = [o for o in objs if o.shape == q[-1]]
        (b,) = [o for o in objs if o.color == a.color and o is not a]
        return b.shape
    if it.template == "color_of_same_shape":
        (a,) = [o for o in objs if o.color == q[-2]]
        (b,) = [o for o in objs if o.shape == a.shape and o is not a]
        return b.color
    raise AssertionError(it.template)


def test_answers_match_the_scene(items):
    for it in items:
        assert it.answer == _meta_answer(it), (it.id, it.question)
        segs = _segments(it.image())
        assert len(segs) == len(it.objects), it.id  # every object is found in the pixels, and nothing else
        by_patch = {}
        for colour, px in segs:
            by_patch[tuple(_patch_box(px))] = colour
        words = it.question.rstrip("?").split()
        if it.template == "color_of_shape":
            # the colour painted where the question's object is
            (k,) = it.targets
            assert by_patch[it.objects[k].box] == it.answer
        elif it.template == "count_color":
            assert sum(c == words[2] for c, _ in segs) == int(it.answer)
        elif it.template == "where":
            assert it.box == [int(v) for v in it.answer.split()]
            assert by_patch[tuple(it.box)] == words[-2]  # the pixels of that colour fill exactly the box
        elif it.template == "related_where":
            assert it.box == [int(v) for v in it.answer.split()] and tuple(it.box) in by_patch
        elif it.template in ("left", "above"):
            a, b = (it.objects[i] for i in it.targets)
            first = a if (a.color, a.shape) == (words[2], words[3]) else b
            second = b if first is a else a
            pa = next(px for c, px in segs if _patch_box(px) == list(first.box))
            pb = next(px for c, px in segs if _patch_box(px) == list(second.box))
            axis = 0 if it.template == "left" else 1
            assert (pa[axis + 2] < pb[axis]) == (it.answer == "yes")
            assert (pb[axis + 2] < pa[axis]) == (it.answer == "no")
        elif it.template == "exists" and it.answer == "no" and it.subtype == "adversarial":
            c, s = words[-2], words[-1]
            assert any((o.color == c) != (o.shape == s) for o in it.objects)


def test_only_prior_shapes_wear_prior_colours_and_questions_use_known_words(items):
    from visroute.testbed.modeling import build_tokenizer

    tok = build_tokenizer()
    for it in items:
        for o in it.objects:
            assert (o.shape in PRIOR_SHAPES) == (o.color in PRIOR_SHAPES.values())
            if o.shape in PRIOR_SHAPES:
                assert o.color == PRIOR_SHAPES[o.shape]
            else:
                assert o.shape in SHAPES
        ids = tok(it.question + " " + it.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids


def test_the_generator_draws_answers_uniformly_within_each_question_form():
    """The blind control relies on it: the words of a question do not give its answer away (training draws
    this way; evaluation sets are balanced on top of it)."""
    items = make_items(600, seed=3, families=["existence", "counting", "attribute", "relation"], balanced=False)
    by = {}
    for it in items:
        by.setdefault(it.template, Counter())[it.answer] += 1
    for template, counts in by.items():
        share = max(counts.values()) / sum(counts.values())
        assert share <= 1.6 / len(counts), (template, counts)
    pope = Counter((it.subtype, it.answer) for it in items if it.family == "existence")
    assert {s for s, _ in pope} == {"random", "popular", "adversarial"}


def test_bordering_tokens_widen_every_hop_by_the_tokens_sharing_an_edge():
    from dataclasses import replace

    from visroute.testbed import with_bordering_tokens

    item = make_items(1, seed=3, families=["relation_grounding"])[0]
    # a small object in the top-left corner (hop 1) and a large one at rows 5-6, columns 10-11 (hop 2)
    corner, block = [0], [5 * 12 + 10, 5 * 12 + 11, 6 * 12 + 10, 6 * 12 + 11]
    item = replace(item, hops=[corner, block], relevant_tokens=sorted(corner + block))
    wide = with_bordering_tokens(item)
    assert wide.hops[0] == [0, 1, 12]
    assert wide.hops[1] == [4 * 12 + 10, 4 * 12 + 11, 5 * 12 + 9, 5 * 12 + 10, 5 * 12 + 11, 6 * 12 + 9,
                            6 * 12 + 10, 6 * 12 + 11, 7 * 12 + 10, 7 * 12 + 11]  # column 12 is off the grid
    assert wide.relevant_tokens == sorted(set(wide.hops[0]) | set(wide.hops[1]))
    assert item.hops == [corner, block] and wide.answer == item.answer  # the item itself is left as it was


def test_answer_choices_are_exactly_the_answers_the_generator_draws():
    from visroute.testbed.questions import TEMPLATES, VISION_FAMILIES, answer_choices

    seen: dict[tuple[str, str], set[str]] = {}
    for it in make_items(2400, seed=8, families=list(VISION_FAMILIES), balanced=False):
        seen.setdefault((it.family, it.template), set()).add(it.answer)
    for fam in VISION_FAMILIES:
        for template in TEMPLATES[fam]:
            choices = answer_choices(fam, template)
            if template in ("where", "related_where"):
                assert choices is None
            else:
                assert set(choices) == seen[(fam, template)], (fam, template)
    assert answer_choices("blind_solvable", "color_of_shape") is None
    with pytest.raises(ValueError, match="unknown question form"):
        answer_choices("attribute", "what_size")


def test_balanced_sets_give_every_answer_of_a_form_in_turn_and_keep_their_prefixes():
    from visroute.testbed.evaluate import majority_rates
    from visroute.testbed.questions import TEMPLATES, answer_choices

    fams = ["attribute", "counting", "relation", "same_attribute", "grounding"]
    items = make_items(5 * 60, seed=9, families=fams)
    assert [a.to_dict() for a in items[:45]] == [b.to_dict() for b in make_items(45, seed=9, families=fams)]
    for fam in fams:
        forms = Counter(it.template for it in items if it.family == fam)
        assert set(forms) == set(TEMPLATES[fam]) and max(forms.values()) - min(forms.values()) <= 1
        for template in TEMPLATES[fam]:
            answers = Counter(it.answer for it in items if it.family == fam and it.template == template)
            choices = answer_choices(fam, template)
            if choices is None:
                continue
            assert set(answers) == set(choices), (template, answers)
            assert max(answers.values()) - min(answers.values()) <= 1, (template, answers)
    # 30 counting items per form, four answers: 8, 8, 7, 7 -> majority 8 / 30
    assert majority_rates(items)["counting"] == pytest.approx(8 / 30)
    assert majority_rates(items)["relation"] == pytest.approx(0.5)
    twice = make_items(16, seed=9, families=["counting", "counting"])  # a family named twice takes turns too
    assert sorted(it.answer for it in twice if it.template == "count_color") == ["0", "0", "1", "1", "2", "2", "3", "3"]


def test_a_form_or_answer_the_generator_never_draws_is_a_clear_error(monkeypatch):
    import visroute.testbed.data as data

    monkeypatch.setattr(data, "MAX_DRAWS", 30)
    with pytest.raises(ValueError, match="answer '7'"):
        data.make_item(1, 0, "counting", "count_color", "7")

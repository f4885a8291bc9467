"""The multi-hop question families, checked against the drawn pixels: the objects are read back from the image
alone (colour from the palette, shape from the pixel mask, box and tokens from the painted pixels), the question
is parsed from its words, and the referent, the answer and the visual tokens of every hop are recomputed from
that reading, without the generator's own bookkeeping."""

from __future__ import annotations

import random
from collections import Counter, deque

import numpy as np
import pytest

from visroute.testbed.data import Item, make_items
from visroute.testbed.questions import (
    FAMILIES,
    MULTI_HOP_FAMILIES,
    VISION_FAMILIES,
    Question,
    answer_of,
    ask,
)
from visroute.testbed.scenes import ALL_COLORS, GRID, PATCH, PRIOR_SHAPES, Obj, random_scene

N_PER_FAMILY = 60


@pytest.fixture(scope="module")
def items():
    return make_items(3 * N_PER_FAMILY, seed=21, families=list(MULTI_HOP_FAMILIES))


def read_objects(image) -> list[dict]:
    """Every object in the image, from the pixels alone: connected regions within 13 of a palette colour on every
    channel (objects are tinted by at most 12; the background is never that saturated or bright). Each is a dict
    of colour, shape, box (patch units, end exclusive) and tokens (the patches holding any of its pixels).

    Shapes: priors by their colour (no other shape wears it); ordinary shapes by two pixels of the bounding box,
    the one a fifth of the way in from the top-left corner and the bottom-left corner itself: a square fills
    both, a circle only the first, a triangle only the second, a cross neither."""
    arr = np.asarray(image).astype(int)
    prior_of = {c: s for s, c in PRIOR_SHAPES.items()}
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
            if len(pts) < 12:  # background specks
                continue
            ys, xs = (np.array(v) for v in zip(*pts))
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            if name in prior_of:
                shape = prior_of[name]
            else:
                filled = set(zip(ys.tolist(), xs.tolist()))
                inner = (y0 + round(0.2 * (y1 - y0)), x0 + round(0.2 * (x1 - x0))) in filled
                corner = (y1, x0) in filled
                shape = {(True, True): "square", (True, False): "circle", (False, True): "triangle",
                         (False, False): "cross"}[(inner, corner)]
            tokens = sorted({int(py // PATCH * GRID + px // PATCH) for py, px in pts})
            box = (int(x0 // PATCH), int(y0 // PATCH), int(x1 // PATCH + 1), int(y1 // PATCH + 1))
            found.append({"color": name, "shape": shape, "box": box, "tokens": tokens})
    return found


def _related_in_pixels(objs: list[dict], named: dict, direction: str) -> list[dict]:
    """Objects whose row (column) span overlaps the named one's and that lie entirely on that side of it."""
    nx1, ny1, nx2, ny2 = named["box"]
    out = []
    for o in objs:
        if o is named:
            continue
        x1, y1, x2, y2 = o["box"]
        if direction in ("left", "right"):
            ok = y1 < ny2 and ny1 < y2 and (x2 <= nx1 if direction == "left" else nx2 <= x1)
        else:
            ok = x1 < nx2 and nx1 < x2 and (y2 <= ny1 if direction == "above" else ny2 <= y1)
        if ok:
            out.append(o)
    return out


def _hops_from_pixels(it: Item, objs: list[dict]) -> tuple[dict, dict]:
    """(named object, referent) of a multi-hop item, from its words and the pixels; asserts both are unique."""
    words = it.question.rstrip("?").split()
    if "other" in words:
        # "what shape is the other object with the color of the {shape}" /
        # "what color is the other object with the shape of the {color} object"
        assert words[4:7] == ["other", "object", "with"], it.question
        shared = words[8]
        named = [o for o in objs if (o["shape"] == words[-1] if shared == "color" else o["color"] == words[-2])]
        assert len(named) == 1, (it.id, it.question)
        others = [o for o in objs if o is not named[0] and o[shared] == named[0][shared]]
        assert len(others) == 1, (it.id, it.question)
        return named[0], others[0]
    # "what color is / what shape is / where is the object {left of|right of|above|below} the {c} {s}"
    direction = words[words.index("object") + 1]
    named = [o for o in objs if (o["color"], o["shape"]) == (words[-2], words[-1])]
    assert len(named) == 1, (it.id, it.question)
    rel = _related_in_pixels(objs, named[0], direction)
    assert len(rel) == 1, (it.id, it.question, [o["box"] for o in rel])
    return named[0], rel[0]


def test_the_pixel_reader_sees_every_object_as_drawn():
    """The reader the tests below rely on, checked once against the scene lists."""
    for it in make_items(90, seed=22):
        objs = read_objects(it.image())
        assert sorted((o["color"], o["shape"], o["box"]) for o in objs) == sorted(
            (o.color, o.shape, o.box) for o in it.objects), it.id


def test_answers_and_hop_tokens_follow_from_the_pixels(items):
    assert Counter(it.family for it in items) == {f: N_PER_FAMILY for f in MULTI_HOP_FAMILIES}
    for it in items:
        objs = read_objects(it.image())
        assert len(objs) == len(it.objects), it.id
        named, referent = _hops_from_pixels(it, objs)
        words = it.question.split()
        if it.template == "related_where":
            assert it.answer == " ".join(map(str, referent["box"])) and it.box == list(referent["box"])
        elif words[1] == "color":
            assert it.answer == referent["color"], (it.id, it.question)
        else:
            assert it.answer == referent["shape"], (it.id, it.question)
        assert it.hops == [named["tokens"], referent["tokens"]], it.id
        assert it.relevant_tokens == sorted(set(named["tokens"]) | set(referent["tokens"]))
        assert [it.objects[k].box for (k,) in it.hop_targets] == [named["box"], referent["box"]]
        assert it.targets == sorted(k for (k,) in it.hop_targets)
        for hop, tokens in ((1, named["tokens"]), (2, referent["tokens"])):
            r = it.relevance(hop)
            assert r.shape == (GRID * GRID,) and r.nonzero()[:, 0].tolist() == tokens
        assert it.relevance().nonzero()[:, 0].tolist() == it.relevant_tokens


def test_the_answers_object_is_not_named_and_question_words_do_not_give_it_away(items):
    for it in items:
        named, referent = (it.objects[k] for (k,) in it.hop_targets)
        if it.family != "same_attribute":
            assert it.question.endswith(f"the {named.color} {named.shape}?")
            assert referent.combo != named.combo
        assert referent.shape not in PRIOR_SHAPES and named.shape not in PRIOR_SHAPES
    more = make_items(900, seed=23, families=["relation_attribute", "same_attribute"], balanced=False)
    by = {}
    for it in more:
        by.setdefault(it.template, Counter())[it.answer] += 1
    for template, counts in by.items():
        assert len(counts) == (6 if template in ("related_color", "color_of_same_shape") else 4), (template, counts)
        share = max(counts.values()) / sum(counts.values())
        assert share <= 1.6 / len(counts), (template, counts)
    subtypes = Counter(it.subtype for it in more if it.family == "relation_attribute")
    assert set(subtypes) == {"left", "right", "above", "below"}


def test_the_referent_must_be_unique_or_the_question_is_not_asked():
    """Adding a second related object, or a second object with the named pair, makes the question ill-posed;
    and over many generated scenes every question the generator keeps has a unique referent."""
    kept = 0
    for seed in range(300):
        rng = random.Random(seed)
        questions, objs = ask(rng, random_scene(rng), [rng.choice(MULTI_HOP_FAMILIES)])
        if not questions:
            continue
        q = questions[0]
        assert answer_of(q, objs) is not None
        kept += 1
        if q.family == "same_attribute":
            continue
        named = next(o for o in objs if o.combo == q.a)
        (referent,) = [o for o in objs if o is not named and _related_obj(named, o, q.subtype)]
        # a twin of the referent on the same side (if there is room), and a twin of the named object
        for x in range(GRID):
            for y in range(GRID):
                twin = Obj(referent.shape, referent.color, x, y, 1)
                if _fits(objs, twin) and _related_obj(named, twin, q.subtype):
                    assert answer_of(q, objs + [twin]) is None
                    break
            else:
                continue
            break
        for x in range(GRID):
            for y in range(GRID):
                twin = Obj(named.shape, named.color, x, y, 1)
                if _fits(objs, twin):
                    assert answer_of(q, objs + [twin]) is None
                    break
            else:
                continue
            break
    assert kept > 200


def test_same_attribute_needs_exactly_two_objects_sharing_the_attribute():
    items = make_items(60, seed=24, families=["same_attribute"])
    for it in items:
        words = it.question.rstrip("?").split()
        name = words[-1] if it.template == "shape_of_same_color" else words[-2]  # "... of the square?" / "red object?"
        q = Question(it.family, it.subtype, it.template, (name,))
        assert q.text == it.question and answer_of(q, it.objects) == it.answer
        named, other = (it.objects[k] for (k,) in it.hop_targets)
        shared = "color" if it.template == "shape_of_same_color" else "shape"
        assert getattr(named, shared) == getattr(other, shared)
        assert sum(getattr(o, shared) == getattr(named, shared) for o in it.objects) == 2
        # a third object sharing the attribute: no single "other" object any more
        third = next(t for x in range(GRID) for y in range(GRID)
                     if _fits(it.objects, t := Obj(other.shape, other.color, x, y, 1)))
        assert answer_of(q, it.objects + [third]) is None


def test_one_hop_items_have_one_hop_and_old_files_still_load():
    for it in make_items(len(FAMILIES) * 2, seed=25):
        assert len(it.hops) == (2 if it.family in MULTI_HOP_FAMILIES else 1)
        if it.family not in MULTI_HOP_FAMILIES:
            assert it.hops == [it.relevant_tokens] and it.hop_targets == [it.targets]
        d = it.to_dict("img.png")
        assert Item.from_dict(d).to_dict("img.png") == d
        old = {k: v for k, v in d.items() if k not in ("hops", "hop_targets")}
        loaded = Item.from_dict(old)
        assert loaded.hops == [it.relevant_tokens] and loaded.hop_targets == [it.targets]
        with pytest.raises(IndexError):
            it.relevance(len(it.hops) + 1)
        with pytest.raises(IndexError):
            it.relevance(0)
    assert set(VISION_FAMILIES) == set(FAMILIES) - {"blind_solvable"}
    assert set(MULTI_HOP_FAMILIES) <= set(VISION_FAMILIES)


def _fits(objs: list[Obj], o: Obj) -> bool:
    """`o` lies on the grid and keeps one free cell to every object (written apart from the generator)."""
    if o.x + o.size > GRID or o.y + o.size > GRID:
        return False
    return all(max(p.x - (o.x + o.size), o.x - (p.x + p.size), p.y - (o.y + o.size), o.y - (p.y + p.size)) >= 1
               for p in objs)


def _related_obj(named: Obj, o: Obj, direction: str) -> bool:
    if direction in ("left", "right"):
        overlap = o.y < named.y + named.size and named.y < o.y + o.size
        return overlap and (o.x + o.size <= named.x if direction == "left" else named.x + named.size <= o.x)
    overlap = o.x < named.x + named.size and named.x < o.x + o.size
    return overlap and (o.y + o.size <= named.y if direction == "above" else named.y + named.size <= o.y)

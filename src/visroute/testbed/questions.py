"""Question families of the testbed, and how a scene is edited so that each question gets the answer drawn for it.

Every question is a `Question` spec: a family, a subtype, a template and the names it mentions. Its answer and
the objects it is about are pure functions of the scene (`answer_of`, `targets_of`), so labels always follow
from the objects that are drawn. Generators draw the *answer first* (uniformly over the family's answers, for
every wording of the question) and then edit the scene until it holds: the words of a question therefore say
nothing about its answer, except in the blind-solvable family, where the world's prior decides it.

Families (`FAMILIES`):
  attribute       "what color is the {shape}?" / "what shape is the {color} object?" (the object is unique)
  existence       "is there a {color} {shape}?" yes/no, POPE-style subtypes for the negatives: random (any
                  absent pair), popular (one of the pairs ordinary scenes draw most), adversarial (an absent pair
                  whose colour or shape is present on another object)
  counting        "how many {color} objects are there?" / "how many {shape}s are there?" (0..3)
  relation        "is the {c1} {s1} left of / above the {c2} {s2}?" yes when the first object lies entirely left
                  of (above) the second, no when entirely right of (below) it; overlapping spans are never asked
  grounding       "where is the {color} {shape}?" -> "x1 y1 x2 y2", its box in patch units (end exclusive)
  blind_solvable  "what color is the {star|heart|moon}?": the prior shapes always have the same colour

Multi-hop families (`MULTI_HOP_FAMILIES`): the object the answer is about is not named; it is found only after a
first lookup. Hop 1 is the object the question names, hop 2 the object the answer is about.
  relation_attribute  "what color / what shape is the object {left of|right of|above|below} the {c} {s}?": the
                      *related* object of the named one in that direction: for left / right, the object whose
                      row span overlaps the named object's and that lies on that side of it; for above / below,
                      the same with column spans. The question is asked only where exactly one object is related
                      (so the referent is unique by construction; "nearest" would name the same object).
  same_attribute      "what shape is the other object with the color of the {shape}?" (the shape is unique,
                      exactly two objects wear its colour) / "what color is the other object with the shape of
                      the {color} object?" (the colour is unique, exactly two objects have its shape)
  relation_grounding  "where is the object {left of|...} the {c} {s}?" -> the related object's box
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from visroute.testbed.scenes import (
    COLORS,
    COMBOS,
    GRID,
    MAX_OBJECTS,
    PLURALS,
    POPULAR,
    PRIOR_SHAPES,
    SHAPES,
    SIZE_NAMES,
    Obj,
    _free,
    contacts,
    new_object,
    place_distractors,
    place_near,
    texture_layout,
)

FAMILIES = ("attribute", "existence", "counting", "relation", "grounding", "blind_solvable",
            "relation_attribute", "same_attribute", "relation_grounding")
MULTI_HOP_FAMILIES = ("relation_attribute", "same_attribute", "relation_grounding")
VISION_FAMILIES = tuple(f for f in FAMILIES if f != "blind_solvable")
TEMPLATES = {  # question forms of each family
    "attribute": ("color_of_shape", "shape_of_color"),
    "existence": ("exists",),
    "counting": ("count_color", "count_shape"),
    "relation": ("left", "above"),
    "grounding": ("where",),
    "blind_solvable": ("color_of_shape",),
    "relation_attribute": ("related_color", "related_shape"),
    "same_attribute": ("shape_of_same_color", "color_of_same_shape"),
    "relation_grounding": ("related_where",),
}
BOX_TEMPLATES = ("where", "related_where")  # questions answered with a box
DIRECTIONS = ("left", "right", "above", "below")  # the subtypes of the relation_* families
DIRECTION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
MAX_COUNT = 3


def answer_choices(family: str, template: str) -> tuple[str, ...] | None:
    """The answers a vision question of this form is drawn from (uniformly), or None where there is no finite set
    to balance: boxes, and the blind-solvable family, whose answer the named shape decides."""
    if family == "blind_solvable" or template in BOX_TEMPLATES:
        return None
    if template not in {t for f in VISION_FAMILIES for t in TEMPLATES[f]}:
        raise ValueError(f"unknown question form {template!r}")
    if template.startswith("count_"):
        return tuple(str(n) for n in range(MAX_COUNT + 1))
    if template in ("exists", "left", "above"):
        return ("no", "yes")
    if template in ("color_of_shape", "related_color", "color_of_same_shape"):
        return tuple(sorted(COLORS))
    return SHAPES  # shape_of_color, related_shape, shape_of_same_color


Generated = tuple  # (Question, edited scene or None, the answer drawn for it)


@dataclass(frozen=True)
class Question:
    """What a question asks. `a`/`b` are the (colour, shape) or single names it mentions (see `text`)."""

    family: str
    subtype: str
    template: str
    a: tuple[str, ...]
    b: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        t, a, b = self.template, self.a, self.b
        if t == "color_of_shape":
            return f"what color is the {a[0]}?"
        if t == "shape_of_color":
            return f"what shape is the {a[0]} object?"
        if t == "exists":
            return f"is there a {a[0]} {a[1]}?"
        if t == "count_color":
            return f"how many {a[0]} objects are there?"
        if t == "count_shape":
            return f"how many {PLURALS[a[0]]} are there?"
        if t in ("left", "above"):
            word = "left of" if t == "left" else "above"
            return f"is the {a[0]} {a[1]} {word} the {b[0]} {b[1]}?"
        if t == "where":
            return f"where is the {a[0]} {a[1]}?"
        if t in ("related_color", "related_shape", "related_where"):
            head = {"related_color": "what color is", "related_shape": "what shape is", "related_where": "where is"}[t]
            return f"{head} the object {DIRECTION_WORDS[self.subtype]} the {a[0]} {a[1]}?"
        if t == "shape_of_same_color":
            return f"what shape is the other object with the color of the {a[0]}?"
        if t == "color_of_same_shape":
            return f"what color is the other object with the shape of the {a[0]} object?"
        raise ValueError(f"unknown template {t!r}")


def _with(objs: list[Obj], pred) -> list[Obj]:
    return [o for o in objs if pred(o)]


def _unique(objs: list[Obj], color: str, shape: str) -> Obj | None:
    found = _with(objs, lambda o: o.color == color and o.shape == shape)
    return found[0] if len(found) == 1 else None


def _entirely_before(p: Obj, q: Obj, axis: str) -> bool:
    if axis == "left":
        return p.x + p.size <= q.x
    return p.y + p.size <= q.y


def related(objs: list[Obj], named: Obj, direction: str) -> list[Obj]:
    """The objects related to `named` in `direction`: for left / right, those whose row span overlaps the row
    span of `named` and that lie entirely on that side of it; for above / below, the same with column spans.
    (Objects never touch, so an object whose row span overlaps lies entirely left or entirely right.)"""
    out = []
    for o in objs:
        if o is named:
            continue
        if direction in ("left", "right"):
            overlap = o.y < named.y + named.size and named.y < o.y + o.size
            side = o.x + o.size <= named.x if direction == "left" else named.x + named.size <= o.x
        else:
            overlap = o.x < named.x + named.size and named.x < o.x + o.size
            side = o.y + o.size <= named.y if direction == "above" else named.y + named.size <= o.y
        if overlap and side:
            out.append(o)
    return out


def _unique_by(objs: list[Obj], pred) -> Obj | None:
    found = _with(objs, pred)
    return found[0] if len(found) == 1 else None


def hop_objects(q: Question, objs: list[Obj]) -> tuple[Obj, Obj] | None:
    """(hop-1 object, hop-2 object) of a multi-hop question, or None when the question is ill-posed: the named
    object is not unique, or the object it leads to is not."""
    t = q.template
    if t.startswith("related_"):
        named = _unique(objs, *q.a)
        if named is None:
            return None
        found = related(objs, named, q.subtype)
        return (named, found[0]) if len(found) == 1 else None
    if t == "shape_of_same_color":
        named = _unique_by(objs, lambda o: o.shape == q.a[0])
        if named is None:
            return None
        others = _with(objs, lambda o: o.color == named.color and o is not named)
        return (named, others[0]) if len(others) == 1 else None
    if t == "color_of_same_shape":
        named = _unique_by(objs, lambda o: o.color == q.a[0])
        if named is None:
            return None
        others = _with(objs, lambda o: o.shape == named.shape and o is not named)
        return (named, others[0]) if len(others) == 1 else None
    raise ValueError(f"{t!r} is not a multi-hop question form")


def answer_of(q: Question, objs: list[Obj]) -> str | None:
    """The answer of `q` in the scene `objs`, or None when the question is ill-posed there."""
    t = q.template
    if q.family in MULTI_HOP_FAMILIES:
        hops = hop_objects(q, objs)
        if hops is None:
            return None
        target = hops[1]
        if t in ("related_color", "color_of_same_shape"):
            return target.color
        if t in ("related_shape", "shape_of_same_color"):
            return target.shape
        return " ".join(str(v) for v in target.box)
    if t == "color_of_shape":
        found = _with(objs, lambda o: o.shape == q.a[0])
        if q.family == "blind_solvable":
            return PRIOR_SHAPES[q.a[0]] if found else None
        return found[0].color if len(found) == 1 else None
    if t == "shape_of_color":
        found = _with(objs, lambda o: o.color == q.a[0])
        return found[0].shape if len(found) == 1 else None
    if t == "exists":
        present = any(o.combo == q.a for o in objs)
        if q.subtype == "adversarial" and not present and not _distractors(objs, q.a):
            return None
        return "yes" if present else "no"
    if t in ("count_color", "count_shape"):
        key = (lambda o: o.color == q.a[0]) if t == "count_color" else (lambda o: o.shape == q.a[0])
        n = len(_with(objs, key))
        return str(n) if n <= MAX_COUNT else None
    if t in ("left", "above"):
        p, r = _unique(objs, *q.a), _unique(objs, *q.b)
        if p is None or r is None:
            return None
        if _entirely_before(p, r, t):
            return "yes"
        if _entirely_before(r, p, t):
            return "no"
        return None
    if t == "where":
        o = _unique(objs, *q.a)
        return None if o is None else " ".join(str(v) for v in o.box)
    raise ValueError(f"unknown template {t!r}")


def _distractors(objs: list[Obj], combo: tuple[str, str]) -> list[Obj]:
    """Objects that share exactly one of the colour and the shape of `combo`."""
    return _with(objs, lambda o: (o.color == combo[0]) != (o.shape == combo[1]))


def hop_targets_of(q: Question, objs: list[Obj]) -> list[list[int]]:
    """Indices of the objects of every hop: one hop (the objects the question is about, see `targets_of`) for
    the one-hop families; for the multi-hop ones [[the named object], [the object the answer is about]]."""
    if q.family in MULTI_HOP_FAMILIES:
        hops = hop_objects(q, objs)
        if hops is None:
            raise ValueError(f"question {q.text!r} is ill-posed on this scene")
        return [[next(i for i, o in enumerate(objs) if o is h)] for h in hops]
    return [_one_hop_targets(q, objs)]


def targets_of(q: Question, objs: list[Obj]) -> list[int]:
    """Indices of the objects the question is about (of all its hops); their visual tokens are its relevant
    tokens.

    For a "no" existence answer these are the distractors (objects with the asked colour or the asked shape):
    the ones a model has to inspect to rule the pair out; with none, the question has no relevant tokens."""
    return sorted({i for hop in hop_targets_of(q, objs) for i in hop})


def _one_hop_targets(q: Question, objs: list[Obj]) -> list[int]:
    t = q.template
    if t == "color_of_shape":
        pick = lambda o: o.shape == q.a[0]  # noqa: E731
    elif t == "shape_of_color":
        pick = lambda o: o.color == q.a[0]  # noqa: E731
    elif t == "exists":
        if any(o.combo == q.a for o in objs):
            pick = lambda o: o.combo == q.a  # noqa: E731
        else:
            pick = lambda o: (o.color == q.a[0]) != (o.shape == q.a[1])  # noqa: E731
    elif t == "count_color":
        pick = lambda o: o.color == q.a[0]  # noqa: E731
    elif t == "count_shape":
        pick = lambda o: o.shape == q.a[0]  # noqa: E731
    elif t in ("left", "above"):
        pick = lambda o: o.combo in (q.a, q.b)  # noqa: E731
    elif t == "where":
        pick = lambda o: o.combo == q.a  # noqa: E731
    else:
        raise ValueError(f"unknown template {t!r}")
    return [i for i, o in enumerate(objs) if pick(o)]


# ---- scene edits -------------------------------------------------------------------------------------------------
def _add(rng: random.Random, objs: list[Obj], shape: str, color: str, where=None) -> list[Obj] | None:
    """`objs` plus a new object (dropping a random object first when the scene is full), or None."""
    objs = list(objs)
    if len(objs) >= MAX_OBJECTS:
        objs.pop(rng.randrange(len(objs)))
    o = new_object(rng, objs, shape, color, where=where)
    return None if o is None else objs + [o]


def _keep_one(rng: random.Random, objs: list[Obj], pred, shape: str, color: str) -> list[Obj] | None:
    """Make exactly one object satisfy `pred`, and make it a `color` `shape`: repaint one existing match and
    remove the others, or add one."""
    matches = [i for i, o in enumerate(objs) if pred(o)]
    if not matches:
        return _add(rng, objs, shape, color)
    keep = rng.choice(matches)
    out = []
    for i, o in enumerate(objs):
        if i == keep:
            out.append(Obj(shape, color, o.x, o.y, o.size, o.margin, o.tint))
        elif i not in matches:
            out.append(o)
    return out


def gen_attribute(rng: random.Random, objs: list[Obj]) -> Generated | None:
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    if rng.random() < 0.5:
        q = Question("attribute", "color", "color_of_shape", (shape,))
        return q, _keep_one(rng, objs, lambda o: o.shape == shape, shape, color), color
    q = Question("attribute", "shape", "shape_of_color", (color,))
    return q, _keep_one(rng, objs, lambda o: o.color == color, shape, color), shape


def gen_existence(rng: random.Random, objs: list[Obj]) -> Generated | None:
    subtype = rng.choice(("random", "popular", "adversarial"))
    combo = rng.choice(POPULAR) if subtype == "popular" else rng.choice(COMBOS)
    color, shape = combo
    q = Question("existence", subtype, "exists", combo)
    if rng.random() < 0.5:
        if any(o.combo == combo for o in objs):
            return q, list(objs), "yes"
        return q, _add(rng, objs, shape, color), "yes"
    out = [o for o in objs if o.combo != combo]
    if subtype == "adversarial" and not _distractors(out, combo):
        if rng.random() < 0.5:
            other = (color, rng.choice([s for s in SHAPES if s != shape]))
        else:
            other = (rng.choice([c for c in COLORS if c != color]), shape)
        out = _add(rng, out, other[1], other[0])
    return q, out, "no"


def gen_counting(rng: random.Random, objs: list[Obj]) -> Generated | None:
    n = rng.randint(0, MAX_COUNT)
    if rng.random() < 0.5:
        color = rng.choice(sorted(COLORS))
        q = Question("counting", "color", "count_color", (color,))
        pred = lambda o: o.color == color  # noqa: E731
        make = lambda: (rng.choice(SHAPES), color)  # noqa: E731
    else:
        shape = rng.choice(SHAPES)
        q = Question("counting", "shape", "count_shape", (shape,))
        pred = lambda o: o.shape == shape  # noqa: E731
        make = lambda: (shape, rng.choice(sorted(COLORS)))  # noqa: E731
    matches = [i for i, o in enumerate(objs) if pred(o)]
    out: list[Obj] | None = list(objs)
    if len(matches) > n:
        drop = set(rng.sample(matches, len(matches) - n))
        out = [o for i, o in enumerate(objs) if i not in drop]
    for _ in range(n - len(matches)):
        s, c = make()
        out = _add(rng, out, s, c) if out is not None else None
    return q, out, str(n)


def gen_relation(rng: random.Random, objs: list[Obj]) -> Generated | None:
    axis = rng.choice(("left", "above"))
    yes = rng.random() < 0.5
    ordinary = [o for o in objs if o.shape in SHAPES]
    unique = [o for o in ordinary if _unique(objs, *o.combo) is not None]
    pairs = [(p, r) for p in unique for r in unique if _entirely_before(p, r, axis)]  # p before r
    out = list(objs)
    if pairs:
        p, r = rng.choice(pairs)
    else:
        if not unique:
            combo = rng.choice([c for c in COMBOS if not any(o.combo == c for o in objs)])
            out = _add(rng, out, combo[1], combo[0])
            if out is None:
                return None
            unique = [out[-1]]
        anchor = rng.choice(unique)
        combo = rng.choice([c for c in COMBOS if not any(o.combo == c for o in out)])
        after = rng.random() < 0.5
        if after:
            where = lambda x, y, s: (x >= anchor.x + anchor.size) if axis == "left" else (y >= anchor.y + anchor.size)  # noqa: E731
        else:
            where = lambda x, y, s: (x + s <= anchor.x) if axis == "left" else (y + s <= anchor.y)  # noqa: E731
        out = _add(rng, out, combo[1], combo[0], where=where)
        if out is None or anchor not in out:
            return None
        new = out[-1]
        p, r = (anchor, new) if after else (new, anchor)
    first, second = (p, r) if yes else (r, p)
    return Question("relation", axis, axis, first.combo, second.combo), out, "yes" if yes else "no"


def gen_grounding(rng: random.Random, objs: list[Obj]) -> Generated | None:
    color, shape = rng.choice(COMBOS)
    out = _keep_one(rng, objs, lambda o: o.combo == (color, shape), shape, color)
    if out is None:
        return None
    o = next(o for o in out if o.combo == (color, shape))
    return Question("grounding", SIZE_NAMES[o.size], "where", (color, shape)), out, " ".join(map(str, o.box))


def gen_blind_solvable(rng: random.Random, objs: list[Obj]) -> Generated | None:
    shape = rng.choice(sorted(PRIOR_SHAPES))
    q = Question("blind_solvable", "prior", "color_of_shape", (shape,))
    if any(o.shape == shape for o in objs):
        return q, list(objs), PRIOR_SHAPES[shape]
    return q, _add(rng, objs, shape, PRIOR_SHAPES[shape]), PRIOR_SHAPES[shape]


def _place(rng: random.Random, objs: list[Obj], shape: str, color: str, where, keep: Obj | None = None
           ) -> list[Obj] | None:
    """`objs` plus a new `color` `shape` at a place where `where(x, y, size)` holds, drawn uniformly among all
    such free places (dropping a random object other than `keep` first when the scene is full), or None."""
    objs = list(objs)
    if len(objs) >= MAX_OBJECTS:
        objs.pop(rng.choice([i for i, o in enumerate(objs) if o is not keep]))
    places = [(x, y, size) for size in (1, 2) for y in range(GRID - size + 1) for x in range(GRID - size + 1)
              if _free(objs, x, y, size) and where(x, y, size)]
    if not places:
        return None
    x, y, size = rng.choice(places)
    margin = rng.randint(1, 3) if size == 1 else rng.randint(2, 5)
    tint = tuple(rng.randint(-12, 12) for _ in range(3))
    return objs + [Obj(shape, color, x, y, size, margin, tint)]


def _in_direction(named: Obj, direction: str):
    """`where(x, y, size)`: a block there would be related to `named` in `direction` (see `related`)."""
    def where(x: int, y: int, size: int) -> bool:
        probe = Obj("square", "red", x, y, size)
        return probe in related([named, probe], named, direction)
    return where


def _named_object(rng: random.Random, objs: list[Obj]) -> tuple[Obj, list[Obj]] | None:
    """An ordinary object whose (colour, shape) is unique in the scene, to be named by a question: an existing
    one, or a new one of a pair the scene lacks. Returns it and the scene holding it."""
    unique = [o for o in objs if o.shape in SHAPES and _unique(objs, *o.combo) is not None]
    if unique and rng.random() < 0.7:
        return rng.choice(unique), list(objs)
    color, shape = rng.choice([c for c in COMBOS if not any(o.combo == c for o in objs)])
    out = _add(rng, objs, shape, color)
    return None if out is None else (out[-1], out)


def _related_scene(rng: random.Random, objs: list[Obj], direction: str, shape: str | None, color: str | None):
    """A scene with a named object (unique pair) whose only related object in `direction` is a new ordinary
    object of `shape` / `color` (drawn when None, never the named pair). Returns (named, related, scene)."""
    found = _named_object(rng, objs)
    if found is None:
        return None
    named, out = found
    out = [o for o in out if o not in related(out, named, direction)]  # clear that side
    combos = [(c, s) for (c, s) in COMBOS if (color is None or c == color) and (shape is None or s == shape)
              and (c, s) != named.combo]
    c, s = rng.choice(combos)
    out = _place(rng, out, s, c, _in_direction(named, direction), keep=named)
    if out is None or named not in out:
        return None
    return named, out[-1], out


def gen_relation_attribute(rng: random.Random, objs: list[Obj]) -> Generated | None:
    direction = rng.choice(DIRECTIONS)
    if rng.random() < 0.5:
        answer = rng.choice(sorted(COLORS))
        res = _related_scene(rng, objs, direction, None, answer)
        template = "related_color"
    else:
        answer = rng.choice(SHAPES)
        res = _related_scene(rng, objs, direction, answer, None)
        template = "related_shape"
    if res is None:
        return None
    named, _, out = res
    return Question("relation_attribute", direction, template, named.combo), out, answer


def gen_relation_grounding(rng: random.Random, objs: list[Obj]) -> Generated | None:
    direction = rng.choice(DIRECTIONS)
    res = _related_scene(rng, objs, direction, None, None)
    if res is None:
        return None
    named, target, out = res
    answer = " ".join(str(v) for v in target.box)
    return Question("relation_grounding", direction, "related_where", named.combo), out, answer


def gen_same_attribute(rng: random.Random, objs: list[Obj]) -> Generated | None:
    """Answer first; then exactly one object of the named shape (colour), and exactly one other object sharing
    its colour (shape), of the answer's shape (colour)."""
    if rng.random() < 0.5:  # "what shape is the other object with the color of the {shape}?"
        answer = rng.choice(SHAPES)
        named_shape = rng.choice([s for s in SHAPES if s != answer])
        color = rng.choice(sorted(COLORS))
        out = _keep_one(rng, objs, lambda o: o.shape == named_shape, named_shape, color)
        if out is None:
            return None
        named = next(o for o in out if o.shape == named_shape)
        out = _keep_one(rng, out, lambda o: o.color == color and o is not named, answer, color)
        q = Question("same_attribute", "color", "shape_of_same_color", (named_shape,))
    else:  # "what color is the other object with the shape of the {color} object?"
        answer = rng.choice(sorted(COLORS))
        named_color = rng.choice([c for c in COLORS if c != answer])
        shape = rng.choice(SHAPES)
        out = _keep_one(rng, objs, lambda o: o.color == named_color, shape, named_color)
        if out is None:
            return None
        named = next(o for o in out if o.color == named_color)
        out = _keep_one(rng, out, lambda o: o.shape == shape and o is not named, shape, answer)
        q = Question("same_attribute", "shape", "color_of_same_shape", (named_color,))
    if out is None or named not in out:
        return None
    return q, out, answer


GENERATORS = {
    "attribute": gen_attribute,
    "existence": gen_existence,
    "counting": gen_counting,
    "relation": gen_relation,
    "grounding": gen_grounding,
    "blind_solvable": gen_blind_solvable,
    "relation_attribute": gen_relation_attribute,
    "same_attribute": gen_same_attribute,
    "relation_grounding": gen_relation_grounding,
}


def ask(rng: random.Random, objs: list[Obj], families: list[str], tries: int = 6,
        templates: set[str] | None = None) -> tuple[list[Question], list[Obj]]:
    """Draw one question per entry of `families`, editing the scene for each, and keep only edits that leave the
    answers of the questions drawn before unchanged. With `templates`, only questions of those forms are kept.
    Returns the questions that succeeded and the final scene."""
    questions: list[Question] = []
    answers: list[str] = []
    for fam in families:
        for _ in range(tries):
            res = GENERATORS[fam](rng, objs)
            if res is None or res[1] is None:
                continue
            q, new, target = res
            if templates is not None and q.template not in templates:
                continue
            a = answer_of(q, new)
            if a != target or any(answer_of(p, new) != b for p, b in zip(questions, answers)):
                continue
            questions.append(q)
            answers.append(a)
            objs = new
            break
    return questions, objs


# ---- world v3: traps added once the questions are drawn -----------------------------------------------------------
def _named_words(questions: list[Question]) -> list[tuple[str, str]]:
    """("color" | "shape", word) for every ordinary colour and shape the questions name."""
    out = []
    for q in questions:
        for w in q.a + q.b:
            if w in COLORS:
                out.append(("color", w))
            elif w in SHAPES:
                out.append(("shape", w))
    return out


def _labels(questions: list[Question], objs: list[Obj]) -> list:
    """Answer and per-hop objects of every question (None where it is ill-posed)."""
    out = []
    for q in questions:
        a = answer_of(q, objs)
        out.append((a, hop_targets_of(q, objs) if a is not None else None))
    return out


def add_traps(rng: random.Random, objs: list[Obj], questions: list[Question], background_seed: int
              ) -> tuple[list[Obj], dict]:
    """The v3 traps for a scene whose questions are drawn: a lure for word matchers (a colour the questions name
    on another shape, or a named shape in another colour), an extra object touching or overlapping another, and
    0-2 salient distractors (large, black, half of them on the bottom row). A lure or extra object is kept only
    if every question keeps its answer and the objects of each of its hops (so it is relevant to none of them).
    Returns the scene's objects (the new ones last: drawn on top) and its metadata: `layout` (texture_layout),
    `distractors`, `lures` (indices of the lure objects), `touching` and `overlapping` (pairs of indices)."""
    labels = _labels(questions, objs)
    lures: list[int] = []
    words = _named_words(questions)
    if words and rng.random() < 0.8 and len(objs) < MAX_OBJECTS:
        kind, word = rng.choice(words)
        if kind == "color":
            color, shape = word, rng.choice(SHAPES)
        else:
            color, shape = rng.choice(sorted(COLORS)), word
        named = {w for q in questions for w in (q.a, q.b)}
        mode = rng.choices(("free", "touch", "overlap"), (0.5, 0.3, 0.2))[0]
        lure = new_object(rng, objs, shape, color) if mode == "free" else place_near(rng, objs, shape, color, mode)
        if lure is not None and (color, shape) not in named and _labels(questions, objs + [lure]) == labels:
            objs = objs + [lure]
            lures.append(len(objs) - 1)
    if objs and rng.random() < 0.5 and len(objs) < MAX_OBJECTS:
        color, shape = rng.choice(COMBOS)
        extra = place_near(rng, objs, shape, color, rng.choice(("touch", "touch", "overlap")))
        if extra is not None and _labels(questions, objs + [extra]) == labels:
            objs = objs + [extra]
    distractors = place_distractors(rng, objs, rng.choice((0, 1, 1, 2)))
    touching, overlapping = contacts(objs)
    scene = {"version": 3, "layout": texture_layout(background_seed),
             "distractors": [d.to_dict() for d in distractors], "lures": lures,
             "touching": touching, "overlapping": overlapping}
    return objs, scene

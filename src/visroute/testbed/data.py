"""Testbed items: one image, one question, its answer and the relevance of every visual token.

`make_items(n, seed)` is deterministic: item i depends only on (seed, i) (and the families asked for). Families
cycle through `FAMILIES`, so any prefix of a set is balanced across them; within a family the question forms and
their answers are balanced too (`balanced_target`). `write_dataset` stores PNG images plus one `items.jsonl`;
`read_dataset` loads them back.

JSONL fields: id, image (path relative to the JSONL), family, subtype, template, question, answer, box
(questions answered with a box, grounding and relation_grounding: [x1, y1, x2, y2] in patch units, end
exclusive; else null), grid ([rows, cols]), relevant_tokens (row-major indices of the visual tokens that hold
the objects the question is about, all hops together), targets (their indices in objects), hops (per hop, the
sorted visual-token indices of that hop's objects: one hop for the one-hop families; for the multi-hop ones hop 1
= the object the question names, hop 2 = the object the answer is about), hop_targets (per hop, the indices in
objects), objects (shape, color, x, y, size, margin, tint; drawn in this order) and background_seed; world-3 items
also have `scene`: the background layout (texture classes of two regions, clutter cells), the salient
distractors, the lure objects and the touching and overlapping object pairs (`questions.add_traps`). Files written before hops
existed load with a single hop: hops = [relevant_tokens], hop_targets = [targets].
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from visroute.testbed.questions import (
    BOX_TEMPLATES,
    FAMILIES,
    TEMPLATES,
    Question,
    answer_choices,
    answer_of,
    add_traps,
    ask,
    hop_targets_of,
)
from visroute.testbed.scenes import (
    GRID,
    Distractor,
    Obj,
    distractor_tokens,
    random_scene,
    render,
    render_v3,
    visible_tokens,
)

HELDOUT_SEED = 1000  # the held-out evaluation set; training draws from a separate stream
WORLDS = (2, 3)  # scene generators: 2 the plain one (v2's), 3 the one with traps (scenes.py, add_traps; v3's)


@dataclass
class Item:
    """One testbed question about one image. `hops[k]` holds the visual tokens of hop k + 1 and `hop_targets[k]`
    its objects; `relevant_tokens` and `targets` are their unions (default: a single hop of them)."""

    id: str
    family: str
    subtype: str
    template: str
    question: str
    answer: str
    objects: list[Obj]
    targets: list[int]
    relevant_tokens: list[int]
    background_seed: int
    box: list[int] | None = None
    image_path: Path | None = None
    grid: tuple[int, int] = (GRID, GRID)
    hops: list[list[int]] | None = None
    hop_targets: list[list[int]] | None = None
    scene: dict | None = None  # world 3: layout, distractors, lures, contacts (see questions.add_traps)
    _image: Image.Image | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.hops is None:
            self.hops = [list(self.relevant_tokens)]
        if self.hop_targets is None:
            self.hop_targets = [list(self.targets)]
        if sorted({t for h in self.hops for t in h}) != sorted(self.relevant_tokens):
            raise ValueError(f"item {self.id}: relevant_tokens is not the union of the hops")

    @property
    def num_visual(self) -> int:
        return self.grid[0] * self.grid[1]

    def image(self) -> Image.Image:
        """The RGB image (read from disk when the item was loaded, else drawn from the scene)."""
        if self._image is None:
            if self.image_path is not None:
                self._image = Image.open(self.image_path).convert("RGB")
            elif self.scene is not None:
                self._image = render_v3(self.objects, self.background_seed, self.scene)
            else:
                self._image = render(self.objects, self.background_seed)
        return self._image

    @property
    def num_hops(self) -> int:
        return len(self.hops)

    def relevance(self, hop: int | None = None) -> torch.Tensor:
        """(num_visual,) float: 1 for the visual tokens of the objects the question is about (all hops; with
        `hop`, only those of hop `hop`, counted from 1 as in "hop 1", "hop 2"), else 0."""
        if hop is None:
            tokens = self.relevant_tokens
        elif 1 <= hop <= len(self.hops):
            tokens = self.hops[hop - 1]
        else:
            raise IndexError(f"item {self.id} has hops 1..{len(self.hops)}, not {hop}")
        r = torch.zeros(self.num_visual)
        r[tokens] = 1.0
        return r

    def to_dict(self, image: str | None = None) -> dict:
        return {
            "id": self.id, "image": image, "family": self.family, "subtype": self.subtype,
            "template": self.template, "question": self.question, "answer": self.answer, "box": self.box,
            "grid": list(self.grid), "relevant_tokens": self.relevant_tokens, "targets": self.targets,
            "hops": self.hops, "hop_targets": self.hop_targets,
            "objects": [o.to_dict() for o in self.objects], "background_seed": self.background_seed,
            **({"scene": self.scene} if self.scene is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> "Item":
        path = (root / d["image"]) if (root is not None and d.get("image")) else None
        return cls(
            id=d["id"], family=d["family"], subtype=d["subtype"], template=d["template"], question=d["question"],
            answer=d["answer"], objects=[Obj.from_dict(o) for o in d["objects"]], targets=list(d["targets"]),
            relevant_tokens=list(d["relevant_tokens"]), background_seed=int(d["background_seed"]),
            box=d.get("box"), image_path=path, grid=tuple(d.get("grid", (GRID, GRID))),
            hops=[list(h) for h in d["hops"]] if d.get("hops") is not None else None,
            hop_targets=[list(h) for h in d["hop_targets"]] if d.get("hop_targets") is not None else None,
            scene=d.get("scene"),
        )


def relevant_tokens(objs: list[Obj], targets: list[int]) -> list[int]:
    """Sorted visual-token indices where the objects `targets` show (the patches holding a pixel of theirs that
    no later object covers)."""
    return sorted({t for i in targets for t in visible_tokens(objs, i)})


def with_bordering_tokens(item: Item) -> Item:
    """A copy of `item` whose every hop also holds the visual tokens sharing an edge with one of its tokens.
    The testbed model reads a box where the object meets the background: kept alone after layer 3, an object's
    own tokens lose much of its box, with these tokens they keep it (TRAINING.md). Relevance itself stays the
    painted tokens; this is the wider oracle to compare box answers with."""
    rows, cols = item.grid

    def widen(tokens: list[int]) -> list[int]:
        out = set(tokens)
        for t in tokens:
            r, c = divmod(t, cols)
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if 0 <= r + dr < rows and 0 <= c + dc < cols:
                    out.add((r + dr) * cols + c + dc)
        return sorted(out)

    hops = [widen(h) for h in item.hops]
    return replace(item, hops=hops, relevant_tokens=sorted({t for h in hops for t in h}))


def blank_tokens(item: Item) -> list[int]:
    """The visual tokens of `item` whose patch shows no pixel of an object or of a (world-3) distractor: background
    only (texture and clutter)."""
    taken = {t for i in range(len(item.objects)) for t in visible_tokens(item.objects, i)}
    for d in (item.scene or {}).get("distractors", []):
        taken.update(distractor_tokens(Distractor(**d)))
    return [t for t in range(item.grid[0] * item.grid[1]) if t not in taken]


def with_blank_context(item: Item, k: int, where: str = "before") -> Item:
    """A copy of `item` whose last hop also holds up to `k` blank tokens (`blank_tokens`): with `where="before"`
    the first ones of the image, before every object's and distractor's token in raster order; with "after" the
    last ones, after all of them. The decoder reads the image causally, so tokens before every object hold
    nothing about the objects, at any layer, while tokens after them may have read them. The oracle kept with
    them (`quality.check_bars`, TRAINING.md) tells a model that misses its objects' information apart from one
    that misses the context it was trained with: how many tokens its attention spreads over."""
    if where not in ("before", "after"):
        raise ValueError(f"where is 'before' or 'after', not {where!r}")
    blank = blank_tokens(item)
    shown = set(range(item.grid[0] * item.grid[1])) - set(blank)
    if where == "before":
        added = [t for t in blank if t < min(shown, default=len(blank))][:k]
    else:
        added = [t for t in blank if t > max(shown, default=-1)][::-1][:k]
    hops = [list(h) for h in item.hops]
    hops[-1] = sorted(set(hops[-1]) | set(added))
    return replace(item, hops=hops, relevant_tokens=sorted({t for h in hops for t in h}))


def build_item(item_id: str, q: Question, objs: list[Obj], background_seed: int, scene: dict | None = None
               ) -> Item:
    """An Item for question `q` on the (final) scene `objs`; answer and relevance are read off the scene."""
    answer = answer_of(q, objs)
    if answer is None:
        raise ValueError(f"question {q.text!r} is ill-posed on this scene")
    hop_targets = hop_targets_of(q, objs)
    targets = sorted({i for hop in hop_targets for i in hop})
    box = [int(v) for v in answer.split()] if q.template in BOX_TEMPLATES else None
    return Item(
        id=item_id, family=q.family, subtype=q.subtype, template=q.template, question=q.text, answer=answer,
        objects=list(objs), targets=targets, relevant_tokens=relevant_tokens(objs, targets),
        background_seed=background_seed, box=box, hops=[relevant_tokens(objs, hop) for hop in hop_targets],
        hop_targets=hop_targets, scene=scene,
    )


MAX_DRAWS = 10_000  # draws of one item; far above what any reachable form and answer needs (a few dozen)


def make_item(seed: int, index: int, family: str | None = None, template: str | None = None,
              answer: str | None = None, world: int = 2) -> Item:
    """Item `index` of the set `seed` (family: FAMILIES[index % len(FAMILIES)] unless given). With `template`
    and/or `answer`, the item's draws go on until the question has that form and answer: the item is then drawn
    from the generator's distribution given them. `world` 3 draws the scene with its traps (a stream of its own,
    so world-2 sets stay what they were)."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; worlds: {WORLDS}")
    family = family or FAMILIES[index % len(FAMILIES)]
    stream = "visroute-testbed" if world == 2 else f"visroute-testbed-w{world}"
    rng = random.Random(f"{stream}:{seed}:{index}")
    for _ in range(MAX_DRAWS):
        background_seed = rng.getrandbits(32)
        questions, objs = ask(rng, random_scene(rng), [family], templates={template} if template else None)
        if questions and (answer is None or answer_of(questions[0], objs) == answer):
            scene = None
            if world == 3:
                objs, scene = add_traps(rng, objs, questions, background_seed)
            return build_item(f"{seed}-{index:06d}", questions[0], objs, background_seed, scene)
    raise ValueError(f"no {family} item of form {template!r} with answer {answer!r} in {MAX_DRAWS} draws")


def balanced_target(seed: int, family: str, j: int) -> tuple[str, str | None]:
    """The question form and answer of the `j`-th item of `family` in a balanced set: forms in turn, and within
    a form every answer once per round, in an order shuffled per round (answer None: no finite set)."""
    templates = TEMPLATES[family]
    template, k = templates[j % len(templates)], j // len(templates)
    choices = answer_choices(family, template)
    if choices is None:
        return template, None
    order = list(choices)
    random.Random(f"visroute-testbed-balance:{seed}:{family}:{template}:{k // len(order)}").shuffle(order)
    return template, order[k % len(order)]


def make_items(n: int, seed: int = 0, families: list[str] | None = None, balanced: bool = True,
               world: int = 2) -> list[Item]:
    """`n` items of the set `seed`, families cycling through `families` (default: all of them).

    `balanced` (the default, for every evaluation set): within each family the question forms come in turn,
    and within each form every answer once per round (`balanced_target`), so the set's majority rate per form is
    its chance rate, and a blind control cannot gain or lose by how the answers happened to fall, as in
    answer-balanced benchmarks (VQA v2, GQA). Each item is still drawn from the generator given its form and
    answer. `balanced=False` draws forms and answers at random, as training does."""
    fams = list(families or FAMILIES)
    for f in fams:
        if f not in FAMILIES:
            raise ValueError(f"unknown family {f!r}; families: {', '.join(FAMILIES)}")
    out, seen = [], Counter()  # seen: items of each family so far
    for i in range(n):
        fam = fams[i % len(fams)]
        template, answer = balanced_target(seed, fam, seen[fam]) if balanced else (None, None)
        seen[fam] += 1
        out.append(make_item(seed, i, fam, template, answer, world))
    return out


def write_dataset(items: list[Item], out: str | Path) -> Path:
    """Write the images (out/images/<id>.png) and out/items.jsonl; returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "items.jsonl"
    with path.open("w") as f:
        for it in items:
            rel = f"images/{it.id}.png"
            it.image().save(out / rel)
            f.write(json.dumps(it.to_dict(rel)) + "\n")
    return path


def read_dataset(path: str | Path) -> list[Item]:
    """Items of a dataset folder (or its items.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / "items.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no testbed dataset at {path}")
    with path.open() as f:
        return [Item.from_dict(json.loads(line), path.parent) for line in f if line.strip()]

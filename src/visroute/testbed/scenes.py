"""The testbed's world: small coloured shapes on a cluttered, textured background, drawn on the patch grid of the
testbed model (12 x 12 patches of 16 pixels, a 192 x 192 image).

Objects sit on whole grid cells: a small object fills one cell, a large one a 2 x 2 block of cells, so every
object covers 1 to 4 visual tokens and its box in patch units is exact. Objects never touch: at least one free
cell lies between any two. Three "prior" shapes always carry the same colour (a star is always yellow, a heart
pink, a moon white); their colours are used by no other shape. That rule is what makes the blind-solvable
question family answerable from the question alone.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

GRID = 12  # patches per side
PATCH = 16  # pixels per patch side
IMAGE_SIZE = GRID * PATCH

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 225),
    "orange": (245, 140, 20),
    "purple": (145, 55, 195),
    "cyan": (25, 195, 205),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

PRIOR_COLORS: dict[str, tuple[int, int, int]] = {
    "yellow": (235, 215, 30),
    "pink": (245, 125, 185),
    "white": (245, 245, 245),
}
PRIOR_SHAPES = {"star": "yellow", "heart": "pink", "moon": "white"}  # shape -> its only colour
ALL_COLORS = {**COLORS, **PRIOR_COLORS}

# (colour, shape) pairs that ordinary scenes draw more often: the "popular" objects of POPE-style negatives.
POPULAR = (
    ("red", "circle"), ("blue", "square"), ("green", "triangle"),
    ("orange", "cross"), ("purple", "circle"), ("cyan", "square"),
)
COMBOS = tuple((c, s) for s in SHAPES for c in COLORS)

MAX_OBJECTS = 8
SIZE_NAMES = {1: "small", 2: "large"}


@dataclass(frozen=True)
class Obj:
    """One object: `shape` and `color` names, top-left grid cell (`x` column, `y` row), `size` in cells per side
    (1 or 2), the empty border in pixels between its cell block and the drawn shape, and a small colour tint."""

    shape: str
    color: str
    x: int
    y: int
    size: int
    margin: int = 2
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) in patch units, end exclusive."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    @property
    def combo(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tint"] = list(self.tint)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        return cls(**{**d, "tint": tuple(d.get("tint", (0, 0, 0)))})


# ---- geometry ----------------------------------------------------------------------------------------------------
def _free(objs: list[Obj], x: int, y: int, size: int) -> bool:
    """The block at (x, y) fits in the grid and keeps one free cell to every object."""
    if x < 0 or y < 0 or x + size > GRID or y + size > GRID:
        return False
    for o in objs:
        if x < o.x + o.size + 1 and o.x < x + size + 1 and y < o.y + o.size + 1 and o.y < y + size + 1:
            return False
    return True


def new_object(rng: random.Random, objs: list[Obj], shape: str, color: str, size: int | None = None,
               where=None, tries: int = 60) -> Obj | None:
    """A new object of `shape`/`color` at a random free place (optionally one where `where(x, y, size)` holds),
    or None when there is no room."""
    if size is None:
        size = rng.choice((1, 2))
    margin = rng.randint(1, 3) if size == 1 else rng.randint(2, 5)
    tint = tuple(rng.randint(-12, 12) for _ in range(3))
    for _ in range(tries):
        x, y = rng.randint(0, GRID - size), rng.randint(0, GRID - size)
        if _free(objs, x, y, size) and (where is None or where(x, y, size)):
            return Obj(shape, color, x, y, size, margin, tint)
    return None


def random_combo(rng: random.Random, prior_rate: float = 0.2, popular_rate: float = 0.35) -> tuple[str, str]:
    """A (colour, shape) for an ordinary scene: sometimes a prior shape, often a popular pair, else uniform."""
    r = rng.random()
    if r < prior_rate:
        shape = rng.choice(sorted(PRIOR_SHAPES))
        return PRIOR_SHAPES[shape], shape
    if r < prior_rate + popular_rate * (1 - prior_rate):
        return rng.choice(POPULAR)
    return rng.choice(COMBOS)


def random_scene(rng: random.Random, n_min: int = 3, n_max: int = 6) -> list[Obj]:
    """An ordinary scene of `n_min`..`n_max` objects."""
    objs: list[Obj] = []
    for _ in range(rng.randint(n_min, n_max)):
        color, shape = random_combo(rng)
        o = new_object(rng, objs, shape, color)
        if o is not None:
            objs.append(o)
    return objs


# ---- drawing -----------------------------------------------------------------------------------------------------
def _polygon_star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_in
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    return pts


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling a square of `side` pixels (drawn 4x larger, then thresholded,
    for clean edges)."""
    s = side * 4
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    e = s - 1
    if shape == "circle":
        d.ellipse((0, 0, e, e), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, e, e), fill=255)
    elif shape == "triangle":
        d.polygon([(s / 2, 0), (e, e), (0, e)], fill=255)
    elif shape == "cross":
        t = s / 3
        d.rectangle((t, 0, 2 * t, e), fill=255)
        d.rectangle((0, t, e, 2 * t), fill=255)
    elif shape == "star":
        d.polygon(_polygon_star(s / 2, s / 2 + s * 0.04, s / 2, s / 5), fill=255)
    elif shape == "heart":
        r = s / 4
        d.ellipse((0, 0, 2 * r, 2 * r), fill=255)
        d.ellipse((s - 2 * r, 0, e, 2 * r), fill=255)
        d.polygon([(0.04 * s, 1.25 * r), (0.96 * s, 1.25 * r), (s / 2, e)], fill=255)
    elif shape == "moon":
        d.ellipse((0, 0, e, e), fill=255)
        d.ellipse((0.38 * s, -0.08 * s, 1.3 * s, 0.92 * s), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = np.asarray(im.resize((side, side), Image.Resampling.BOX)) >= 128
    small.flags.writeable = False
    return small


def object_pixels(o: Obj) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) bool: the pixels object `o` paints."""
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    side = o.size * PATCH - 2 * o.margin
    x0, y0 = o.x * PATCH + o.margin, o.y * PATCH + o.margin
    full[y0:y0 + side, x0:x0 + side] = shape_mask(o.shape, side)
    return full


def object_tokens(o: Obj) -> list[int]:
    """Indices (row-major over the patch grid) of the visual tokens whose patch holds any pixel of `o`."""
    px = object_pixels(o).reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3))
    return [int(i) for i in np.flatnonzero(px)]


def background(rng: random.Random) -> np.ndarray:
    """A muted, textured, cluttered background (H, W, 3) uint8: low-saturation base colour, a smooth shading
    field, pixel noise, thin grey strokes and specks. Nothing in it is saturated like an object."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    base = rng.randint(80, 150)
    tint = np.array([rng.randint(-18, 18) for _ in range(3)], dtype=np.float32)
    coarse = nrng.uniform(-24, 24, size=(4, 4)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    shade = shade[..., None]
    noise = nrng.standard_normal(size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * 6
    img = np.clip(base + tint + shade + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(25, 50)):
        g = rng.randint(55, 185)
        col = tuple(min(255, max(0, g + rng.randint(-14, 14))) for _ in range(3))
        x0, y0 = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        length, ang = rng.uniform(5, 32), rng.uniform(0, 2 * np.pi)
        d.line((x0, y0, x0 + length * np.cos(ang), y0 + length * np.sin(ang)), fill=col, width=1)
    for _ in range(rng.randint(10, 25)):
        g = rng.randint(55, 185)
        col = tuple(min(255, max(0, g + rng.randint(-14, 14))) for _ in range(3))
        x0, y0, w = rng.randint(0, IMAGE_SIZE - 3), rng.randint(0, IMAGE_SIZE - 3), rng.randint(1, 3)
        d.rectangle((x0, y0, x0 + w, y0 + w), fill=col)
    return np.asarray(im).copy()


def render(objs: list[Obj], background_seed: int) -> Image.Image:
    """Draw `objs` onto the background of `background_seed`. The background does not depend on the objects, so
    a scene with one object removed differs from the full scene exactly at that object's pixels."""
    img = background(random.Random(background_seed))
    for o in objs:
        col = np.clip(np.array(ALL_COLORS[o.color]) + np.array(o.tint), 0, 255).astype(np.uint8)
        img[object_pixels(o)] = col
    return Image.fromarray(img)


# ---- world v3: textured backgrounds, clutter, salient distractors, lures, touching and overlapping objects -----
# A v3 scene is a v2 scene (the objects its questions are about) plus a layout that the questions never name:
# a background of two regions of different texture classes, clutter marks in some background cells, and large
# black "salient distractors". All of it is recorded per item (`Item.scene`), with the lures and the touching and
# overlapping pairs, so every label stays exact: relevance is the tokens an object actually paints (see
# `visible_tokens`), and no question is ever about a distractor or a background region.
TEXTURES = ("plain", "stripes", "checker", "dots")
DISTRACTOR_SHAPES = ("bar", "ring", "blob")  # never named by a question (not in the vocabulary)
DISTRACTOR_COLOR = (12, 12, 12)  # black: darker than any background pixel (those stay in 39..211)
DISTRACTOR_SIZES = ((3, 2), (2, 3), (3, 3), (4, 2), (2, 4))  # (w, h) in cells: larger than any object


@dataclass(frozen=True)
class Distractor:
    """A salient distractor: a large black `shape` (one of DISTRACTOR_SHAPES) on the cell block at column `x`,
    row `y`, `w` x `h` cells, drawn `margin` pixels inside it. Never asked about, never an "object"."""

    shape: str
    x: int
    y: int
    w: int
    h: int
    margin: int = 2

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.w, self.y + self.h)

    def to_dict(self) -> dict:
        return asdict(self)


def distractor_pixels(d: Distractor) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) bool: the pixels distractor `d` paints."""
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    w, h = d.w * PATCH - 2 * d.margin, d.h * PATCH - 2 * d.margin
    x0, y0 = d.x * PATCH + d.margin, d.y * PATCH + d.margin
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    if d.shape == "bar":
        draw.rectangle((0, h // 4, w - 1, h - 1 - h // 4), fill=255)
    elif d.shape == "ring":
        t = max(4, min(w, h) // 5)
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
        draw.ellipse((t, t, w - 1 - t, h - 1 - t), fill=0)
    elif d.shape == "blob":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    else:
        raise ValueError(f"unknown distractor shape {d.shape!r}")
    full[y0:y0 + h, x0:x0 + w] = np.asarray(im) >= 128
    return full


def _cells(pixels: np.ndarray) -> list[int]:
    """Row-major indices of the patches holding any of `pixels`."""
    return [int(i) for i in np.flatnonzero(pixels.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3)))]


def distractor_tokens(d: Distractor) -> list[int]:
    return _cells(distractor_pixels(d))


def visible_pixels(objs: list[Obj], i: int) -> np.ndarray:
    """The pixels of object `objs[i]` that no later object (drawn over it) covers."""
    px = object_pixels(objs[i]).copy()
    for o in objs[i + 1:]:
        px &= ~object_pixels(o)
    return px


def visible_tokens(objs: list[Obj], i: int) -> list[int]:
    """Indices of the visual tokens whose patch shows a pixel of object `objs[i]` (objects are drawn in list
    order; where none overlap this is `object_tokens`)."""
    return _cells(visible_pixels(objs, i))


def texture_layout(background_seed: int) -> dict:
    """The background layout of a v3 scene, a pure function of its seed: the image is cut along a cell line
    (`split` "v": a vertical cut at column `cut`; "h": a horizontal one at row `cut`) into two regions with
    texture classes `classes` (indices into TEXTURES, first region: left / top), and `clutter` lists the
    background cells that hold a clutter mark."""
    rng = random.Random(f"visroute-texture:{background_seed}")
    first = rng.randrange(len(TEXTURES))
    second = rng.choice([t for t in range(len(TEXTURES)) if t != first])
    cells = rng.sample(range(GRID * GRID), rng.randint(8, 24))
    return {"split": rng.choice("vh"), "cut": rng.randint(3, GRID - 3), "classes": [first, second],
            "clutter": sorted(cells)}


def texture_of_cells(layout: dict) -> np.ndarray:
    """(GRID * GRID,) texture class of every cell, row-major."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    second = (cols >= layout["cut"]) if layout["split"] == "v" else (rows >= layout["cut"])
    return np.where(second, layout["classes"][1], layout["classes"][0])


def _texture(cls: str, rng: random.Random, nrng: np.random.Generator) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) float image of texture class `cls` (muted grey, slight tint)."""
    base = rng.randint(85, 145)
    tint = np.array([rng.randint(-12, 12) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    if cls == "plain":
        coarse = nrng.uniform(-12, 12, size=(4, 4)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(coarse, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                     Image.Resampling.BILINEAR))
    elif cls == "stripes":
        period, angle = rng.choice((6, 8)), rng.choice((0, 1, 2, 3))
        u = (xx, yy, xx + yy, xx - yy)[angle]
        field_ = np.where((u // (period / 2)) % 2 == 0, 24.0, -24.0)
    elif cls == "checker":
        side = rng.choice((4, 8))
        field_ = np.where(((xx // side) + (yy // side)) % 2 == 0, 22.0, -22.0)
    elif cls == "dots":
        step = 8
        ox, oy = rng.randrange(step), rng.randrange(step)
        d2 = ((xx - ox) % step - step / 2) ** 2 + ((yy - oy) % step - step / 2) ** 2
        field_ = np.where(d2 <= 3.0, rng.choice((-40.0, 40.0)), 0.0)
    else:
        raise ValueError(f"unknown texture {cls!r}")
    noise = nrng.standard_normal(size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * 3
    return base + tint + field_[..., None] + noise


def background_v3(background_seed: int, layout: dict | None = None) -> np.ndarray:
    """The v3 background (H, W, 3) uint8: two texture regions and the clutter marks of `texture_layout`.
    Pixels stay in 39..211 and low in saturation: nothing in it looks like an object or a distractor."""
    layout = layout or texture_layout(background_seed)
    rng = random.Random(f"visroute-texture-pixels:{background_seed}")
    nrng = np.random.default_rng(rng.getrandbits(63))
    textures = [_texture(TEXTURES[c], rng, nrng) for c in layout["classes"]]
    cls = texture_of_cells(layout).reshape(GRID, GRID).repeat(PATCH, 0).repeat(PATCH, 1)
    img = np.where((cls == layout["classes"][1])[..., None], textures[1], textures[0])
    im = Image.fromarray(np.clip(img, 40, 210).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for cell in layout["clutter"]:  # a few grey strokes and specks inside the cell, 2 px from its edges
        cy, cx = divmod(cell, GRID)
        x0, y0 = cx * PATCH + 2, cy * PATCH + 2
        for _ in range(rng.randint(2, 4)):
            g = rng.choice((rng.randint(45, 70), rng.randint(180, 205)))
            col = tuple(g + rng.randint(-6, 6) for _ in range(3))
            pts = [(x0 + rng.randint(0, PATCH - 5), y0 + rng.randint(0, PATCH - 5)) for _ in range(2)]
            draw.line(pts, fill=col, width=rng.choice((1, 2)))
    return np.asarray(im).copy()


def render_v3(objs: list[Obj], background_seed: int, scene: dict) -> Image.Image:
    """Draw a v3 scene: its background (`scene["layout"]`), its distractors, then `objs` in list order (a later
    object covers an earlier one where they overlap)."""
    img = background_v3(background_seed, scene["layout"])
    for d in scene.get("distractors", []):
        img[distractor_pixels(Distractor(**d))] = DISTRACTOR_COLOR
    for o in objs:
        col = np.clip(np.array(ALL_COLORS[o.color]) + np.array(o.tint), 0, 255).astype(np.uint8)
        img[object_pixels(o)] = col
    return Image.fromarray(img)


def _blocks_meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 0) -> bool:
    """The cell blocks a and b (x1, y1, x2, y2) come within `gap` cells of each other (gap 0: they overlap)."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_distractors(rng: random.Random, objs: list[Obj], n: int, bottom: float = 0.6) -> list[Distractor]:
    """Up to `n` distractors on blocks that overlap no object and no other distractor (they may touch); with
    probability `bottom` each sits on the bottom row of the grid, nearest the question text."""
    out: list[Distractor] = []
    for _ in range(n):
        w, h = rng.choice(DISTRACTOR_SIZES)
        at_bottom = rng.random() < bottom
        places = [(x, y) for y in ([GRID - h] if at_bottom else range(GRID - h + 1)) for x in range(GRID - w + 1)
                  if not any(_blocks_meet((x, y, x + w, y + h), o.box) for o in objs)
                  and not any(_blocks_meet((x, y, x + w, y + h), d.box) for d in out)]
        if places:
            x, y = rng.choice(places)
            out.append(Distractor(rng.choice(DISTRACTOR_SHAPES), x, y, w, h, rng.randint(1, 3)))
    return out


def place_near(rng: random.Random, objs: list[Obj], shape: str, color: str, mode: str) -> Obj | None:
    """A new small object that touches an object ("touch": its cell shares an edge with an object's block, no
    gap) or overlaps a corner cell of a large object ("overlap"; drawn over it), and overlaps no other block."""
    places = []
    for y in range(GRID):
        for x in range(GRID):
            cell = (x, y, x + 1, y + 1)
            hit = [o for o in objs if _blocks_meet(cell, o.box)]
            if mode == "touch":
                near = [o for o in objs if _blocks_meet(cell, o.box, gap=1)
                        and (x in (o.x - 1, o.x + o.size) and o.y <= y < o.y + o.size
                             or y in (o.y - 1, o.y + o.size) and o.x <= x < o.x + o.size)]
                if not hit and near:
                    places.append((x, y))
            elif mode == "overlap":
                if len(hit) == 1 and hit[0].size == 2:
                    places.append((x, y))
            else:
                raise ValueError(f"unknown placement {mode!r}")
    if not places:
        return None
    x, y = rng.choice(places)
    return Obj(shape, color, x, y, 1, rng.randint(2, 3), tuple(rng.randint(-12, 12) for _ in range(3)))


def contacts(objs: list[Obj]) -> tuple[list[list[int]], list[list[int]]]:
    """(touching pairs, overlapping pairs) of object indices: blocks sharing an edge with no gap, blocks that
    share a cell."""
    touch, overlap = [], []
    for i, a in enumerate(objs):
        for j in range(i + 1, len(objs)):
            b = objs[j]
            if _blocks_meet(a.box, b.box):
                overlap.append([i, j])
            elif _blocks_meet(a.box, b.box, gap=1) and (
                    (a.x + a.size == b.x or b.x + b.size == a.x) and a.y < b.y + b.size and b.y < a.y + a.size
                    or (a.y + a.size == b.y or b.y + b.size == a.y) and a.x < b.x + b.size and b.x < a.x + a.size):
                touch.append([i, j])
    return touch, overlap

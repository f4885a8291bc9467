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

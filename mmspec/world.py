"""Synthetic visual world: scenes of coloured shapes on a 3x3 grid, their
rendering, and question/answer pairs in natural, varied English.

Everything is deterministic for a seed: ``sample_example(seed)`` always returns
the same image, question and answer.  Training uses seeds below ``10**9``;
``held_out_seeds`` returns seeds at or above ``10**9`` that training never sees.

The module also holds the scorers used by ``mmspec.world_eval`` (each QA
carries its canonical key fact in ``QA.key``) and the chat-format helpers that
must stay byte-identical to the processor's chat template (``CHAT_TEMPLATE``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------
# Vocabulary of the world
# ---------------------------------------------------------------------------

IMAGE_SIZE = 224
GRID = 3
CELL = IMAGE_SIZE / GRID

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
SHAPE_PLURALS = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}

COLORS = {
    "red": (220, 30, 35),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (35, 160, 60),
    "blue": (35, 85, 225),
    "purple": (135, 45, 180),
    "pink": (255, 120, 190),
    "brown": (125, 75, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
COLOR_NAMES = tuple(COLORS)

SIZES = ("small", "medium", "large")
SIZE_RADIUS = {"small": 11, "medium": 20, "large": 30}
SIZE_RANK = {"small": 0, "medium": 1, "large": 2}

POSITIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
POSITION_NAMES = tuple(p for row in POSITIONS for p in row)
CORNERS = {"top left", "top right", "bottom left", "bottom right"}

TEXT_WORDS = ("ok", "up", "go", "hi", "no")
TEXT_DIGITS = tuple(str(i) for i in range(10))
TEXT_VALUES = TEXT_WORDS + TEXT_DIGITS
# Shapes roomy enough to hold a glyph big enough for 16x16 ViT patches.
TEXT_SHAPES = {"large": ("circle", "square", "hexagon", "diamond", "heart"), "medium": ("circle", "square", "hexagon")}
TEXT_FONT = {"large": 30, "medium": 24}
TEXT_PROB = 0.3

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Backgrounds never use an object colour name, so colour words stay unambiguous.
BG_LIGHT = {
    "cream": (245, 236, 212),
    "mint": (212, 240, 222),
    "lavender": (226, 216, 242),
    "sand": (226, 210, 178),
    "silver": (205, 208, 212),
}
BG_DARK = {
    "navy": (28, 38, 78),
    "charcoal": (62, 62, 68),
    "teal": (22, 82, 88),
    "plum": (78, 38, 70),
    "olive": (74, 78, 36),
}
BG_PATTERNS = ("plain", "gradient", "striped", "speckled")

VISUAL_WORDS: frozenset[str] = frozenset(
    list(COLOR_NAMES)
    + ["grey", "gray"]
    + list(SHAPES)
    + list(SHAPE_PLURALS.values())
    + list(SIZES)
    + ["top", "bottom", "left", "right", "middle", "center", "centre", "corner"]
    + list(NUMBER_WORDS)
    + list(TEXT_DIGITS)
    + list(TEXT_WORDS)
    + list(BG_LIGHT)
    + list(BG_DARK)
)

# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col), 0..2
    text: str | None = None
    dx: int = 0  # jitter in pixels (rendering only)
    dy: int = 0
    rgb: tuple[int, int, int] = (0, 0, 0)  # jittered fill colour (rendering only)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell[0]][self.cell[1]]

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "cell": list(self.cell),
            "position": self.position,
            "text": self.text,
        }


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str  # natural description, e.g. "a plain cream background"
    bg_name: str = "cream"
    bg_pattern: str = "plain"
    bg_dark: bool = False
    bg_seed: int = 0
    bg_param: int = 0  # stripe width / gradient direction

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    def at(self, cell: tuple[int, int]) -> SceneObject | None:
        for o in self.objects:
            if tuple(o.cell) == tuple(cell):
                return o
        return None


def _bg_description(name: str, pattern: str) -> str:
    if pattern == "plain":
        return f"a plain {name} background"
    if pattern == "gradient":
        return f"a {name} gradient background"
    if pattern == "striped":
        return f"a {name} background with faint stripes"
    return f"a speckled {name} background"


def sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 8)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objects = []
    for cell in cells:
        shape = rng.choice(SHAPES)
        color = rng.choice(COLOR_NAMES)
        size = rng.choice(SIZES)
        text = None
        # (5 + 3) / 8 / 3 of the objects can hold text; 0.9 of those do: ~30% of all objects.
        if shape in TEXT_SHAPES.get(size, ()) and rng.random() < 0.9:
            text = rng.choice(TEXT_VALUES)
        r = SIZE_RADIUS[size]
        jit = max(0, min(8, int(CELL / 2 - r - 3)))
        dx, dy = rng.randint(-jit, jit), rng.randint(-jit, jit)
        base = COLORS[color]
        rgb = tuple(int(min(255, max(0, v + rng.randint(-12, 12)))) for v in base)
        objects.append(SceneObject(shape, color, size, cell, text, dx, dy, rgb))
    dark = rng.random() < 0.4
    name = rng.choice(list(BG_DARK if dark else BG_LIGHT))
    pattern = rng.choice(BG_PATTERNS)
    return Scene(
        objects=objects,
        background=_bg_description(name, pattern),
        bg_name=name,
        bg_pattern=pattern,
        bg_dark=dark,
        bg_seed=rng.randrange(2**31),
        bg_param=rng.randrange(4),
    )


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _shift(rgb, d):
    return tuple(int(min(255, max(0, v + d))) for v in rgb)


def _render_background(scene: Scene) -> Image.Image:
    base = np.array((BG_DARK if scene.bg_dark else BG_LIGHT)[scene.bg_name], dtype=np.float32)
    img = np.tile(base, (IMAGE_SIZE, IMAGE_SIZE, 1))
    sign = 1.0 if scene.bg_dark else -1.0
    if scene.bg_pattern == "gradient":
        t = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)
        if scene.bg_param % 2 == 0:
            ramp = t[:, None, None]
        else:
            ramp = t[None, :, None]
        if scene.bg_param >= 2:
            ramp = 1.0 - ramp
        img = img + sign * 40.0 * ramp
    elif scene.bg_pattern == "striped":
        width = 8 + 4 * scene.bg_param
        idx = np.arange(IMAGE_SIZE)
        stripe = ((idx // width) % 2).astype(np.float32) * sign * 22.0
        if scene.bg_param % 2 == 0:
            img = img + stripe[:, None, None]
        else:
            img = img + stripe[None, :, None]
    elif scene.bg_pattern == "speckled":
        nrng = np.random.default_rng(scene.bg_seed)
        img = img + nrng.normal(0.0, 9.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _shape_points(shape: str, cx: float, cy: float, r: float):
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy2 = cy + r * 0.15
        return [(cx + r * math.cos(a), cy2 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in [i * math.pi / 3 for i in range(6)]]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        w = r * 0.33
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - (y + 2.5) * r / 16.5))
        return pts
    raise ValueError(shape)


_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # very old Pillow
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 224x224 RGB PIL image (deterministic)."""
    img = _render_background(scene)
    draw = ImageDraw.Draw(img)
    outline = (235, 235, 235) if scene.bg_dark else (30, 30, 30)
    for o in scene.objects:
        r = SIZE_RADIUS[o.size]
        cx = (o.cell[1] + 0.5) * CELL + o.dx
        cy = (o.cell[0] + 0.5) * CELL + o.dy
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb, outline=outline, width=2)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, r), fill=o.rgb, outline=outline, width=2)
        if o.text:
            fsize = int(TEXT_FONT[o.size] * (0.85 if o.shape in ("heart", "diamond") else 1.0))
            tcol = (0, 0, 0) if _luma(o.rgb) > 140 else (255, 255, 255)
            ty = cy - (r * 0.05 if o.shape == "heart" else 0)
            draw.text((cx, ty), o.text, fill=tcol, font=_font(fsize), anchor="mm")
    return img


# ---------------------------------------------------------------------------
# Language helpers
# ---------------------------------------------------------------------------


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou8" else "a"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _num(n: int) -> str:
    return NUMBER_WORDS[n]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _place(rng: random.Random, pos: str) -> str:
    opts = [f"in the {pos}", f"at the {pos}", f"in the {pos} cell"]
    if pos in CORNERS:
        opts += [f"in the {pos} corner"] * 2
    if pos == "center":
        opts = ["in the center", "at the center", "in the center cell", "right in the center"]
    return rng.choice(opts)


def _text_phrase(rng: random.Random, text: str) -> str:
    if text.isdigit():
        return rng.choice([
            f" with the number {text} on it",
            f" marked with the digit {text}",
            f" labelled '{text}'",
            f" showing the number {text}",
            f" with a {text} written on it",
        ])
    return rng.choice([
        f" with the word '{text}' on it",
        f" labelled '{text}'",
        f" bearing the word '{text}'",
        f" with '{text}' written on it",
        f" that reads '{text}'",
    ])


def _np(rng: random.Random, o: SceneObject) -> str:
    """Indefinite noun phrase with size, colour and shape."""
    u = rng.random()
    if u < 0.75:
        return f"{_a(o.size)} {o.size} {o.color} {o.shape}"
    if u < 0.9:
        return f"{_a(o.color)} {o.color} {o.shape} of {o.size} size"
    return f"{_a(o.size)} {o.size} {o.shape} coloured {o.color}"


# ---------------------------------------------------------------------------
# QA
# ---------------------------------------------------------------------------

QA_KINDS = ("describe", "count", "color", "shape", "position", "exists", "relation", "read_text", "text_only")
# Questions that refer to an object by its attributes need a search over the image (the
# hardest skill to learn: "Where is the star?"); they get most of the non-description weight.
QA_WEIGHTS = {
    "describe": 0.22,
    "count": 0.14,
    "color": 0.10,
    "shape": 0.10,
    "position": 0.13,
    "exists": 0.10,
    "relation": 0.08,
    "read_text": 0.08,
    "text_only": 0.05,
}
# Kinds whose accuracy world_eval reports.
EVAL_KINDS = ("describe", "count", "color", "shape", "position", "exists", "relation", "read_text")


@dataclass
class QA:
    kind: str
    prompt: str
    answer: str
    key: object = None  # canonical fact: int count, colour/shape/position name, "yes"/"no", text, ...
    needs_image: bool = True
    meta: dict = field(default_factory=dict)


DESCRIBE_PROMPTS = (
    "Describe the image.",
    "Describe this picture in detail.",
    "What do you see in this image?",
    "Give a detailed description of the scene.",
    "Tell me about everything in this image.",
    "Describe every object in the picture.",
    "What is in this picture?",
    "Please describe the image.",
)


def _order(rng: random.Random, objs: list[SceneObject]) -> list[SceneObject]:
    u = rng.random()
    if u < 0.6:
        return sorted(objs, key=lambda o: (o.cell[0], o.cell[1]))
    if u < 0.8:
        return sorted(objs, key=lambda o: (o.cell[1], o.cell[0]))
    return sorted(objs, key=lambda o: (-SIZE_RANK[o.size], o.cell[0], o.cell[1]))


def _object_clause(rng: random.Random, o: SceneObject) -> str:
    np_ = _np(rng, o)
    txt = _text_phrase(rng, o.text) if o.text else ""
    pl = _place(rng, o.position)
    forms = [
        f"there is {np_}{txt} {pl}",
        f"{pl} there is {np_}{txt}",
        f"{pl} we can see {np_}{txt}",
        f"{np_}{txt} sits {pl}",
        f"{np_}{txt} is {pl}",
        f"the {o.position} cell holds {np_}{txt}",
        f"{pl} is {np_}{txt}",
        f"you can see {np_}{txt} {pl}",
    ]
    return rng.choice(forms)


def describe_answer(scene: Scene, rng: random.Random) -> str:
    objs = _order(rng, scene.objects)
    n = len(objs)
    sents = []
    noun = rng.choice(["objects", "shapes"])
    bg_in_intro = rng.random() < 0.4
    if n == 1:
        intro = rng.choice([
            "The image shows a single object",
            "There is only one object in this image",
            "This picture contains just one shape",
            "I can see one object",
        ])
    else:
        intro = rng.choice([
            f"The image shows {_num(n)} {noun}",
            f"There are {_num(n)} {noun} in this image",
            f"This picture contains {_num(n)} {noun}",
            f"I can see {_num(n)} {noun}",
        ])
    if bg_in_intro:
        intro += rng.choice([" on ", " placed on ", " arranged on "]) + scene.background
    sents.append(intro + ".")
    i = 0
    while i < n:
        first = i == 0
        last = i == n - 1
        if not last and rng.random() < 0.25:
            c1 = _object_clause(rng, objs[i])
            c2 = _object_clause(rng, objs[i + 1])
            sep = rng.choice([", and ", "; ", ", while "])
            body = c1 + sep + c2
            i += 2
        else:
            body = _object_clause(rng, objs[i])
            i += 1
        done = i >= n
        if first:
            conn = rng.choice(["", "", "", "First, ", "Starting off, "])
        elif done and n > 2:
            conn = rng.choice(["Finally, ", "Lastly, ", "", ""])
        else:
            conn = rng.choice(["", "", "Next, ", "Also, ", "Then ", "In addition, ", "After that, "])
        sents.append(_cap(conn + body) + ".")
    if not bg_in_intro and rng.random() < 0.6:
        sents.append(rng.choice([
            f"Everything is drawn on {scene.background}.",
            f"The background is {scene.background[2:] if scene.background.startswith('a ') else scene.background}.",
            f"All of this sits on {scene.background}.",
        ]))
    if rng.random() < 0.2:
        sents.append(rng.choice(["That is everything in the image.", "Nothing else is in the picture.", "That is all."]))
    return " ".join(sents)


# --- references -------------------------------------------------------------

_REF_FORMS = (
    ("shape",),
    ("color",),
    ("size", "shape"),
    ("color", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
    ("position",),
    ("position", "shape"),
    ("position", "color"),
)


def _attr(o: SceneObject, a: str):
    return o.position if a == "position" else getattr(o, a)


def _ref_text(o: SceneObject, form) -> str:
    """Definite noun phrase without article, e.g. 'large red circle'."""
    if form == ("position",):
        return f"object in the {o.position}"
    words = []
    if "size" in form:
        words.append(o.size)
    if "color" in form:
        words.append(o.color)
    words.append(o.shape if "shape" in form else "object")
    s = " ".join(words)
    if "position" in form:
        s += f" in the {o.position}"
    return s


def _unique_refs(scene: Scene, o: SceneObject, exclude=()):
    out = []
    for form in _REF_FORMS:
        if any(a in exclude for a in form):
            continue
        same = [p for p in scene.objects if all(_attr(p, a) == _attr(o, a) for a in form)]
        if len(same) == 1:
            out.append(form)
    return out


def _pick_ref(rng, scene, o, exclude=(), prefer_attrs=False):
    forms = _unique_refs(scene, o, exclude)
    if not forms:
        return None
    if prefer_attrs or rng.random() < 0.7:
        nonpos = [f for f in forms if "position" not in f]
        if nonpos:
            forms = nonpos
    return _ref_text(o, rng.choice(forms))


# --- per-kind generators ----------------------------------------------------


def _qa_describe(scene, rng):
    return QA("describe", rng.choice(DESCRIBE_PROMPTS), describe_answer(scene, rng), key=None)


def _count_list(rng, objs, drop):
    """'a large circle in the top left and a small star in the center'."""
    items = []
    for o in sorted(objs, key=lambda o: o.cell):
        words = [o.size] + ([o.color] if drop != "color" else []) + ([o.shape] if drop != "shape" else ["object"])
        items.append(f"{_a(words[0])} {' '.join(words)} in the {o.position}")
    return _join(items)


def _qa_count(scene, rng):
    objs = scene.objects
    u = rng.random()
    if u < 0.25:
        n = len(objs)
        prompt = rng.choice([
            "How many objects are there?",
            "How many shapes are in the image?",
            "Count the objects in the picture.",
            "How many objects can you see?",
            "How many things are in this image?",
        ])
        if n == 1:
            ans = rng.choice(["There is one object.", "I can see one object.", "The image contains one object.", "One."])
        else:
            ans = rng.choice([
                f"There are {_num(n)} objects.",
                f"I can see {_num(n)} objects.",
                f"The image contains {_num(n)} objects.",
                f"{_cap(_num(n))}.",
                f"There are {_num(n)} shapes in total.",
            ])
        return QA("count", prompt, ans, key=n, meta={"what": "total"})
    present = rng.random() < 0.8
    attr = rng.choice(["color", "shape", "size"])
    if attr == "color":
        val = rng.choice([o.color for o in objs]) if present else rng.choice(COLOR_NAMES)
        plural_noun = rng.choice(["objects", "shapes"])
        desc_pl = f"{val} {plural_noun}"
        desc_sg = f"{val} {plural_noun[:-1]}"
        prompt = rng.choice([
            f"How many {val} objects are there?",
            f"How many {val} shapes can you see?",
            f"Count the {val} objects.",
            f"How many objects are {val}?",
        ])
    elif attr == "shape":
        val = rng.choice([o.shape for o in objs]) if present else rng.choice(SHAPES)
        desc_pl = SHAPE_PLURALS[val]
        desc_sg = val
        prompt = rng.choice([
            f"How many {SHAPE_PLURALS[val]} are there?",
            f"How many {SHAPE_PLURALS[val]} can you see?",
            f"Count the {SHAPE_PLURALS[val]} in the image.",
            f"How many {SHAPE_PLURALS[val]} are in the picture?",
        ])
    else:
        val = rng.choice([o.size for o in objs]) if present else rng.choice(SIZES)
        desc_pl = f"{val} objects"
        desc_sg = f"{val} object"
        prompt = rng.choice([
            f"How many {val} objects are there?",
            f"How many objects are {val}?",
            f"Count the {val} shapes.",
        ])
    match = [o for o in objs if getattr(o, attr) == val]
    n = len(match)
    if n == 0:
        ans = rng.choice([
            f"There are no {desc_pl}.",
            f"There are no {desc_pl} in the image.",
            f"None. I cannot see any {desc_pl}.",
        ])
    else:
        lst = _count_list(rng, match, attr)
        if n == 1:
            ans = rng.choice([
                f"There is one {desc_sg}: {lst}.",
                f"There is one {desc_sg}, {lst}.",
                f"Just one: {lst}.",
                f"There is one {desc_sg}.",
            ])
        else:
            ans = rng.choice([
                f"There are {_num(n)} {desc_pl}: {lst}.",
                f"I count {_num(n)} {desc_pl}: {lst}.",
                f"{_cap(_num(n))}: {lst}.",
                f"There are {_num(n)} {desc_pl}.",
            ])
    return QA("count", prompt, ans, key=n, meta={"what": attr, "value": val})


def _pick_object(rng, scene, exclude):
    """A random object and a phrase that picks it out without naming the asked-for attribute
    (ref is None when no object can be referred to that way; o is then the last one tried)."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    ref = None
    for o in objs:
        ref = _pick_ref(rng, scene, o, exclude=exclude)
        if ref:
            break
    return o, ref


def _qa_color(scene, rng):
    o, ref = _pick_object(rng, scene, ("color",))
    prompt = rng.choice([
        f"What colour is the {ref}?",
        f"What color is the {ref}?",
        f"Which colour does the {ref} have?",
        f"Tell me the colour of the {ref}.",
    ])
    ans = rng.choice([
        f"It is {o.color}.",
        f"The {ref} is {o.color}.",
        f"{_cap(o.color)}.",
        f"The colour of the {ref} is {o.color}.",
        f"It's {o.color}.",
    ])
    return QA("color", prompt, ans, key=o.color, meta={"cell": list(o.cell)})


def _qa_shape(scene, rng):
    o, ref = _pick_object(rng, scene, ("shape",))
    prompt = rng.choice([
        f"What shape is the {ref}?",
        f"What is the shape of the {ref}?",
        f"Which shape is the {ref}?",
        f"What kind of shape is the {ref}?",
    ])
    ans = rng.choice([
        f"It is {_a(o.shape)} {o.shape}.",
        f"The {ref} is {_a(o.shape)} {o.shape}.",
        f"It's {_a(o.shape)} {o.shape}.",
        f"{_cap(_a(o.shape))} {o.shape}.",
        f"The {ref} has the shape of {_a(o.shape)} {o.shape}.",
    ])
    return QA("shape", prompt, ans, key=o.shape, meta={"cell": list(o.cell)})


def _qa_position(scene, rng):
    o, ref = _pick_object(rng, scene, ("position",))
    if ref is None:
        return None
    prompt = rng.choice([
        f"Where is the {ref}?",
        f"Where is the {ref} located?",
        f"In which cell is the {ref}?",
        f"Where can I find the {ref}?",
    ])
    pl = _place(rng, o.position)
    ans = rng.choice([
        f"It is {pl}.",
        f"The {ref} is {pl}.",
        f"You can find it {pl}.",
        f"{_cap(pl)}.",
        f"The {ref} is located {pl}.",
    ])
    return QA("position", prompt, ans, key=o.position, meta={"cell": list(o.cell)})


def _qa_exists(scene, rng):
    objs = scene.objects
    if rng.random() < 0.5:
        o = rng.choice(objs)
        color, shape = o.color, o.shape
    else:
        present = {(o.color, o.shape) for o in objs}
        while True:
            color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
            if (color, shape) not in present:
                break
    prompt = rng.choice([
        f"Is there {_a(color)} {color} {shape}?",
        f"Is there {_a(color)} {color} {shape} in the image?",
        f"Can you see {_a(color)} {color} {shape}?",
        f"Does the picture contain {_a(color)} {color} {shape}?",
    ])
    match = sorted([o for o in objs if o.color == color and o.shape == shape], key=lambda o: o.cell)
    if match:
        if len(match) == 1:
            m = match[0]
            ans = rng.choice([
                f"Yes, there is {_a(m.size)} {m.size} {color} {shape} {_place(rng, m.position)}.",
                f"Yes. It is {_place(rng, m.position)}.",
                f"Yes, {_place(rng, m.position)}.",
            ])
        else:
            where = _join([f"the {m.position}" for m in match])
            ans = rng.choice([
                f"Yes, there are {_num(len(match))} of them, in {where}.",
                f"Yes, in fact there are {_num(len(match))}: in {where}.",
            ])
        key = "yes"
    else:
        same_shape = [o for o in objs if o.shape == shape]
        same_color = [o for o in objs if o.color == color]
        if same_shape:
            cols = sorted({o.color for o in same_shape}, key=COLOR_NAMES.index)
            just = rng.choice([
                f"There is {_a(shape)} {shape}, but it is {_join(cols)}." if len(same_shape) == 1
                else f"There are {SHAPE_PLURALS[shape]}, but they are {_join(cols)}.",
            ])
        elif same_color:
            shp = sorted({o.shape for o in same_color}, key=SHAPES.index)
            just = f"The only {color} objects are {_join([SHAPE_PLURALS[s] for s in shp])}." if len(same_color) > 1 \
                else f"The only {color} object is {_a(same_color[0].shape)} {same_color[0].shape}."
        else:
            just = rng.choice([
                f"There are no {SHAPE_PLURALS[shape]} at all.",
                f"In fact there is nothing {color} and no {shape} in the image.",
            ])
        ans = rng.choice([f"No, there is no {color} {shape}. {just}", f"No. {just}"])
        key = "no"
    return QA("exists", prompt, ans, key=key, meta={"color": color, "shape": shape})


def _qa_relation(scene, rng):
    objs = scene.objects
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    ra = _pick_ref(rng, scene, a, prefer_attrs=True)
    rb = _pick_ref(rng, scene, b, prefer_attrs=True)
    rel = rng.choice(["left", "right", "above", "below", "larger", "smaller"])
    (ar, ac), (br, bc) = a.cell, b.cell
    if rel in ("left", "right"):
        prompt = rng.choice([
            f"Is the {ra} to the {rel} of the {rb}?",
            f"Is the {ra} on the {rel} side of the {rb}?",
        ])
        truth = ac < bc if rel == "left" else ac > bc
        if ac == bc:
            why = f"they are in the same column: the {ra} is in the {a.position} and the {rb} is in the {b.position}"
        else:
            side = "left" if ac < bc else "right"
            why = f"the {ra} is in the {a.position}, to the {side} of the {rb} in the {b.position}"
    elif rel in ("above", "below"):
        prompt = rng.choice([f"Is the {ra} {rel} the {rb}?", f"Is the {ra} placed {rel} the {rb}?"])
        truth = ar < br if rel == "above" else ar > br
        if ar == br:
            why = f"they are in the same row: the {ra} is in the {a.position} and the {rb} is in the {b.position}"
        else:
            side = "above" if ar < br else "below"
            why = f"the {ra} is in the {a.position}, {side} the {rb} in the {b.position}"
    else:
        word = rng.choice(["larger", "bigger"]) if rel == "larger" else "smaller"
        prompt = rng.choice([f"Is the {ra} {word} than the {rb}?", f"Is the {ra} {word} than the {rb} in size?"])
        sa, sb = SIZE_RANK[a.size], SIZE_RANK[b.size]
        truth = sa > sb if rel == "larger" else sa < sb
        if sa == sb:
            why = f"they are the same size, both are {a.size}"
        else:
            why = f"the {ra} is {a.size} and the {rb} is {b.size}"
    key = "yes" if truth else "no"
    ans = f"{'Yes' if truth else 'No'}, {why}."
    return QA("relation", prompt, ans, key=key, meta={"rel": rel, "a": list(a.cell), "b": list(b.cell)})


def _text_value(t: str) -> str:
    return f"the number {t}" if t.isdigit() else f"the word '{t}'"


def _qa_read_text(scene, rng):
    texted = [o for o in scene.objects if o.text]
    if not texted or rng.random() < 0.15:
        prompt = rng.choice([
            "Is there any text in the image?",
            "What text can you see in the image?",
            "Is anything written on the objects?",
        ])
        if not texted:
            ans = rng.choice([
                "No, there is no text in the image.",
                "No, none of the objects has anything written on it.",
                "There is no writing on any of the objects.",
            ])
            return QA("read_text", prompt, ans, key="none", meta={"all": []})
        parts = [f"{_a(o.color)} {o.color} {o.shape} in the {o.position} shows {_text_value(o.text)}"
                 for o in sorted(texted, key=lambda o: o.cell)]
        ans = "Yes: " + _join(parts) + "."
        return QA("read_text", prompt, ans, key="+".join(o.text for o in sorted(texted, key=lambda o: o.cell)),
                  meta={"all": [o.text for o in texted]})
    o = rng.choice(texted)
    ref = _pick_ref(rng, scene, o)
    prompt = rng.choice([
        f"What is written on the {ref}?",
        f"What does the {ref} say?",
        f"Read the text on the {ref}.",
        f"Which word or number is on the {ref}?",
    ])
    if o.text.isdigit():
        ans = rng.choice([
            f"It shows the number {o.text}.",
            f"The number {o.text} is written on it.",
            f"The {ref} has the digit {o.text} on it.",
            f"It says {o.text}.",
        ])
    else:
        ans = rng.choice([
            f"It says '{o.text}'.",
            f"The word '{o.text}' is written on it.",
            f"The {ref} has the word '{o.text}' on it.",
            f"It reads '{o.text}'.",
        ])
    return QA("read_text", prompt, ans, key=o.text, meta={"cell": list(o.cell)})


TEXT_ONLY_BANK = (
    (
        ("What colours can objects have?", "Which colors can the objects be?", "List the possible colours."),
        (
            f"Objects can be {_join(list(COLOR_NAMES))}.",
            f"There are ten possible colours: {_join(list(COLOR_NAMES))}.",
        ),
    ),
    (
        ("What shapes can appear?", "Which shapes exist in this world?", "List the possible shapes."),
        (
            f"The shapes are {_join([SHAPE_PLURALS[s] for s in SHAPES])}.",
            f"There are eight shapes: {_join([SHAPE_PLURALS[s] for s in SHAPES])}.",
        ),
    ),
    (
        ("What sizes can objects have?", "Which sizes are there?"),
        ("Objects come in three sizes: small, medium and large.", "There are three sizes: small, medium and large."),
    ),
    (
        ("How many cells does the grid have?", "How big is the grid?"),
        (
            "The grid has nine cells, arranged in three rows and three columns.",
            "It is a three by three grid, so there are nine cells.",
        ),
    ),
    (
        ("What positions can an object have?", "Name the cells of the grid."),
        (f"An object can be in the {_join(list(POSITION_NAMES))}.", f"The nine cells are the {_join(list(POSITION_NAMES))}."),
    ),
    (
        ("How many objects can an image contain?", "What is the largest number of objects in a picture?"),
        (
            "An image contains between one and eight objects, at most one per cell.",
            "Each picture has from one to eight objects, never more than one in a cell.",
        ),
    ),
    (
        ("Hello!", "Hi there!", "Good morning!"),
        ("Hello! Ask me anything about the image.", "Hi! I can describe the picture or answer questions about it."),
    ),
    (
        ("Who are you?", "What can you do?"),
        (
            "I am a small vision-language model. I can describe pictures of coloured shapes and answer questions about them.",
            "I describe images of shapes on a grid and answer questions about their colours, shapes, sizes and positions.",
        ),
    ),
    (
        ("Thank you!", "Thanks a lot."),
        ("You are welcome!", "Glad I could help."),
    ),
)


def _qa_text_only(scene, rng):
    prompts, answers = rng.choice(TEXT_ONLY_BANK)
    return QA("text_only", rng.choice(prompts), rng.choice(answers), key=None, needs_image=False)


_GENERATORS = {
    "describe": _qa_describe,
    "count": _qa_count,
    "color": _qa_color,
    "shape": _qa_shape,
    "position": _qa_position,
    "exists": _qa_exists,
    "relation": _qa_relation,
    "read_text": _qa_read_text,
    "text_only": _qa_text_only,
}


def make_qa(scene: Scene, rng: random.Random, kind: str | None = None) -> QA:
    """Sample a question/answer pair about ``scene`` (of ``kind`` if given)."""
    if kind is None:
        kind = rng.choices(QA_KINDS, weights=[QA_WEIGHTS[k] for k in QA_KINDS])[0]
    if kind not in _GENERATORS:
        raise ValueError(f"unknown QA kind {kind!r}; expected one of {QA_KINDS}")
    qa = _GENERATORS[kind](scene, rng)
    if qa is None:  # not askable for this scene (e.g. relation with one object)
        qa = _qa_count(scene, rng) if kind != "count" else _qa_describe(scene, rng)
    return qa


TRAIN_SEED_LIMIT = 10**9
HELD_OUT_BASE = 10**9 + 7_000_000


def sample_example(seed: int, kind: str | None = None):
    """(image, qa, scene), fully determined by ``seed`` (and ``kind``)."""
    rng = random.Random(seed)
    scene = sample_scene(rng)
    qa = make_qa(scene, rng, kind)
    return render(scene), qa, scene


def held_out_seeds(n: int, offset: int = 0) -> list[int]:
    """Seeds never used in training (training uses seeds < 10**9)."""
    return [HELD_OUT_BASE + offset + i for i in range(n)]


def default_calibration(n: int = 4) -> list[tuple[Image.Image, str]]:
    """(image, prompt + answer) pairs of held-out examples: what an untrained feature drafter's
    attention-entropy calibration runs over (`mmspec.drafters.feature.calibrate.calibrate_entropy`)."""
    out = []
    for s in held_out_seeds(n, offset=900_000):
        img, qa, _ = sample_example(s)
        out.append((img, qa.prompt + "\n" + qa.answer))
    return out


# ---------------------------------------------------------------------------
# Chat format (must match CHAT_TEMPLATE exactly; tests check it)
# ---------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{- '<s>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- else -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' ' -}}{%- endif -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' ' -}}{%- endif -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def build_messages(prompt: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def format_prompt(prompt: str, with_image: bool = True) -> str:
    """The chat-templated prompt (generation prompt included), unexpanded <image>."""
    return "<s>USER: " + ("<image>\n" if with_image else "") + prompt + "\nASSISTANT:"


def format_answer(answer: str) -> str:
    """What follows the prompt during training: the answer and the eos token."""
    return " " + answer + "</s>"


# ---------------------------------------------------------------------------
# Scoring (used by world_eval and the tests)
# ---------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+")
_POS_RE = re.compile("|".join(sorted((re.escape(p) for p in POSITION_NAMES), key=len, reverse=True)))
_NUM_VALUE = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUM_VALUE.update({"no": 0, "none": 0})


def _words(s: str) -> list[str]:
    return _WORD_RE.findall(s.lower())


def _positions_in(s: str) -> list[str]:
    return _POS_RE.findall(s.lower())


def _numbers_in(s: str) -> set[int]:
    return {_NUM_VALUE[w] for w in _words(s) if w in _NUM_VALUE}


def score_answer(qa: QA, scene: Scene, answer: str) -> bool:
    """Exact correctness of a model answer for the question ``qa`` about ``scene``."""
    a = answer.strip().lower()
    if qa.kind == "describe":
        return score_description(scene, answer)["ok"]
    if qa.kind == "count":
        # Only the part before a justification list counts for the number.
        head = a.split(":")[0]
        nums = _numbers_in(head)
        return nums == {int(qa.key)}
    words = set(_words(a))
    if qa.kind == "color":
        found = {c for c in COLOR_NAMES if c in words}
        return found == {qa.key}
    if qa.kind == "shape":
        found = {s for s in SHAPES if s in words or SHAPE_PLURALS[s] in words}
        return found == {qa.key}
    if qa.kind == "position":
        return set(_positions_in(a)) == {qa.key}
    if qa.kind in ("exists", "relation"):
        w = _words(a)
        return bool(w) and w[0] == qa.key
    if qa.kind == "read_text":
        if qa.key == "none":
            return bool(_words(a)) and (_words(a)[0] == "no" or "no text" in a or "no writing" in a)
        expected = str(qa.key).split("+")
        toks = re.findall(r"'([a-z0-9]+)'|(?:number|digit) ([0-9])|says ([0-9])", a)
        got = [next(x for x in t if x) for t in toks]
        return sorted(got) == sorted(expected)
    return True  # text_only: not scored


_CLAUSE_SPLIT = re.compile(r"; |, and |, while ")
_TEXT_RE = re.compile(r"'([a-z0-9]+)'|(?:number|digit) ([0-9])|with an? ([0-9]) written")


def score_description(scene: Scene, answer: str) -> dict:
    """Does the description mention every object with correct colour, shape,
    size, position and text, and nothing that is not there?"""
    text = answer.strip().lower()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    seen: dict[str, dict] = {}
    errors: list[str] = []
    by_pos = {o.position: o for o in scene.objects}
    for sent in sentences:
        for clause in _CLAUSE_SPLIT.split(sent):
            poss = _positions_in(clause)
            words = set(_words(clause))
            if not poss:
                nums = {_NUM_VALUE[w] for w in words if w in NUMBER_WORDS}
                if nums and nums != {len(scene.objects)}:
                    errors.append(f"wrong count in {clause!r}")
                continue
            if len(set(poss)) > 1:
                errors.append(f"several positions in {clause!r}")
                continue
            pos = poss[0]
            o = by_pos.get(pos)
            if o is None:
                errors.append(f"hallucinated object in {pos}")
                continue
            if pos in seen:
                errors.append(f"{pos} described twice")
                continue
            res = {
                "color": {c for c in COLOR_NAMES if c in words} == {o.color},
                "shape": {s for s in SHAPES if s in words or SHAPE_PLURALS[s] in words} == {o.shape},
                "size": {s for s in SIZES if s in words} == {o.size},
            }
            texts = [next(x for x in t if x) for t in _TEXT_RE.findall(clause)]
            res["text"] = texts == ([o.text] if o.text else [])
            seen[pos] = res
            for k, v in res.items():
                if not v:
                    errors.append(f"wrong {k} for {pos}")
    for o in scene.objects:
        if o.position not in seen:
            errors.append(f"missing {o.position}")
    attr_ok = {k: sum(1 for r in seen.values() if r[k]) for k in ("color", "shape", "size", "text")}
    return {
        "ok": not errors,
        "errors": errors,
        "n_objects": len(scene.objects),
        "n_mentioned": len(seen),
        "attr_correct": attr_ok,
    }


# ---------------------------------------------------------------------------
# Examples for the app
# ---------------------------------------------------------------------------

EXAMPLE_SPECS = (
    (11, "describe"),
    (23, "count"),
    (37, "relation"),
    (41, "read_text"),
    (59, "describe"),
    (73, "color"),
)


def write_examples(dir: str) -> list[dict]:
    """Write ~6 example PNGs and examples.json ({"image", "prompt", ...}) to ``dir``."""
    os.makedirs(dir, exist_ok=True)
    out = []
    for i, (seed0, kind) in enumerate(EXAMPLE_SPECS):
        seed = HELD_OUT_BASE + 500_000_000 + seed0
        # read_text examples need an object with text: search deterministically.
        while True:
            rng = random.Random(seed)
            scene = sample_scene(rng)
            if kind != "read_text" or any(o.text for o in scene.objects):
                if kind != "relation" or len(scene.objects) >= 3:
                    break
            seed += 1000
        qa = make_qa(scene, rng, kind)
        name = f"example_{i + 1}_{kind}.png"
        render(scene).save(os.path.join(dir, name))
        out.append({"image": name, "prompt": qa.prompt, "kind": kind, "reference_answer": qa.answer})
    with open(os.path.join(dir, "examples.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out

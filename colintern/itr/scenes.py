"""Synthetic two-object scenes for image-text retrieval with boxes and spatial relations (docs/CONTRACT.md §12).

    python -m colintern.itr.scenes OUT [--n_train 600] [--n_eval 80] [--size 224] [--seed 0]

Each scene: a light background and two objects (a colour and a shape each, the two colours distinct), placed so
that exactly one of six relations holds, decided by geometry with margins (never ambiguous):
    left of / right of   boxes disjoint along x, and the centres' |dx| >= 1.5 |dy|
    above / below        boxes disjoint along y, and |dy| >= 1.5 |dx|
    inside / containing  the inner box within the central part of the outer object (a square or a circle)
(the seed's "outside" overlaps every other class; "containing" is the converse of "inside" instead).
Objects are drawn without anti-aliasing, so each object's pixels are exactly its colour and each stored box is the
bounding box of those pixels (tested). Rows (boxes normalised [x1, y1, x2, y2] in [0, 1], pixel edges):
    {"image": "images/s_00012.png", "image_id": "s_00012", "caption": "a red circle left of a blue square",
     "captions": [that, "a blue square right of a red circle"], "phrase": "the red circle and the blue square",
     "subject": {"label": "red circle", "box": [...]}, "object": {"label": "blue square", "box": [...]},
     "relation": "left of", "key": "red circle|left of|blue square", "twin": "s_00013"}
`key` names the meaning (the converse paraphrase has the same key). The held-out split uses (subject, relation,
object) combinations never seen in training, and gives every scene a relation-swapped twin: the same two objects in
the converse placement ("twin" names each other), on which a bag-of-words model is at chance.
Writes OUT/train/itr.jsonl, OUT/eval/itr.jsonl (image paths relative to each file's folder), their images, and
OUT/scenes_manifest.json. Deterministic: the same seed writes byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from colintern.cli import parse_config
from colintern.settings import ScenesConfig
from colintern.errors import UserError

MANIFEST = "scenes_manifest.json"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40), "orange": (250, 140, 20), "yellow": (230, 200, 20), "green": (30, 150, 60),
    "blue": (35, 75, 220), "purple": (140, 45, 180), "black": (20, 20, 20),
}
BACKGROUND = (238, 236, 230)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
OUTER_SHAPES: tuple[str, ...] = ("circle", "square")  # what can contain another object
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "inside", "containing")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "inside": "containing",
            "containing": "inside"}
CANONICAL = ("left of", "above", "inside")  # a key always names the relation in one of these directions
HELD_OUT_EVERY = 5  # a (subject, relation, object) meaning whose hash is 0 mod this is eval-only


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def meaning_key(subject: str, relation: str, obj: str) -> str:
    """The canonical key of "subject relation object": converse phrasings share it."""
    if relation in CANONICAL:
        return f"{subject}|{relation}|{obj}"
    return f"{obj}|{CONVERSE[relation]}|{subject}"


def held_out(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def draw_object(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, ...], fill: tuple[int, int, int] | int) -> None:
    """One filled shape whose drawn pixels span exactly box = (x0, y0, x1, y1), inclusive pixel coordinates."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 3)
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w, y1), fill=fill)
        h = max(2, (y1 - y0) // 3)
        draw.rectangle((x0, cy - h // 2, x1, cy - h // 2 + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def place(relation: str, size: int, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(subject box, object box) in pixels for which `relation` holds by the module's geometry rules."""
    if relation in ("inside", "containing"):
        outer_side = int(rng.integers(size * 45 // 100, size * 70 // 100))
        ox0 = int(rng.integers(4, size - outer_side - 4))
        oy0 = int(rng.integers(4, size - outer_side - 4))
        inner_side = int(rng.integers(outer_side * 25 // 100, outer_side * 40 // 100))
        centre = outer_side // 2
        jitter = max(1, outer_side // 10)  # the inner box stays in the central part (inside a circle too)
        ix0 = ox0 + centre - inner_side // 2 + int(rng.integers(-jitter, jitter + 1))
        iy0 = oy0 + centre - inner_side // 2 + int(rng.integers(-jitter, jitter + 1))
        inner = (ix0, iy0, ix0 + inner_side - 1, iy0 + inner_side - 1)
        outer = (ox0, oy0, ox0 + outer_side - 1, oy0 + outer_side - 1)
        return (inner, outer) if relation == "inside" else (outer, inner)
    side_a, side_b = (int(rng.integers(size * 18 // 100, size * 30 // 100)) for _ in range(2))
    gap = int(rng.integers(size * 6 // 100, size * 16 // 100))
    along = side_a + gap + side_b  # extent of the pair along the relation's axis
    start = int(rng.integers(4, size - along - 4))
    first = start + side_a // 2, start + side_a + gap + side_b // 2  # centres along the axis
    max_across = max(0, min(int((first[1] - first[0]) / 1.5) - 1, size // 10))
    across = int(rng.integers(size // 4, 3 * size // 4))
    offset = int(rng.integers(-max_across, max_across + 1))
    centres_across = (across, min(max(across + offset, side_b // 2 + 4), size - side_b // 2 - 5))

    def square(c_along: int, c_across: int, side: int, horizontal: bool) -> tuple[int, int, int, int]:
        a0, b0 = c_along - side // 2, c_across - side // 2
        return (a0, b0, a0 + side - 1, b0 + side - 1) if horizontal else (b0, a0, b0 + side - 1, a0 + side - 1)

    horizontal = relation in ("left of", "right of")
    low = square(first[0], centres_across[0], side_a, horizontal)    # the left (or upper) one
    high = square(first[1], centres_across[1], side_b, horizontal)   # the right (or lower) one
    return (low, high) if relation in ("left of", "above") else (high, low)


def relation_of(a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    """The relation of box a to box b by the module's rules, None when none holds with its margin."""
    if a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3]:
        return "inside"
    if b[0] >= a[0] and b[1] >= a[1] and b[2] <= a[2] and b[3] <= a[3]:
        return "containing"
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    if (a[2] < b[0] or b[2] < a[0]) and abs(dx) >= 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if (a[3] < b[1] or b[3] < a[1]) and abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def render(subject: SceneObject, obj: SceneObject, boxes: tuple[tuple[int, ...], tuple[int, ...]], relation: str,
           size: int) -> tuple[Image.Image, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The scene and the inclusive pixel boxes of what each object drew (measured, not assumed: a polygon's
    rasterisation may stop a pixel short of its vertices). For inside/containing the outer object is drawn first,
    so the inner one stays whole on top (and the outer one's edges stay visible)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    order = [(1, obj), (0, subject)] if relation != "containing" else [(0, subject), (1, obj)]
    drawn: list[tuple[int, ...]] = [(), ()]
    for which, thing in order:
        mask = Image.new("1", (size, size), 0)
        draw_object(ImageDraw.Draw(mask), thing.shape, boxes[which], 1)
        x0, y0, x1, y1 = mask.getbbox() or (0, 0, 1, 1)  # exclusive right/bottom (a drawn shape is never empty)
        drawn[which] = (x0, y0, x1 - 1, y1 - 1)
        draw_object(draw, thing.shape, boxes[which], COLOURS[thing.colour])
    return image, (drawn[0], drawn[1])


def normalised(box: tuple[int, ...], size: int) -> list[float]:
    """Inclusive pixel box -> [x1, y1, x2, y2] in [0, 1] at pixel edges."""
    return [round(box[0] / size, 6), round(box[1] / size, 6), round((box[2] + 1) / size, 6),
            round((box[3] + 1) / size, 6)]


def pick_objects(relation: str, rng: np.random.Generator, both_outer: bool = False) -> tuple[SceneObject, SceneObject]:
    """Two objects of distinct colours; the containing one (both, for an inside/containing twin pair) a circle or
    a square."""
    colours = list(COLOURS)
    c1, c2 = rng.choice(len(colours), 2, replace=False)
    shape_a = SHAPES[int(rng.integers(len(SHAPES)))]
    shape_b = SHAPES[int(rng.integers(len(SHAPES)))]
    if relation == "inside" or (both_outer and relation == "containing"):
        shape_b = OUTER_SHAPES[int(rng.integers(len(OUTER_SHAPES)))]
    if relation == "containing" or (both_outer and relation == "inside"):
        shape_a = OUTER_SHAPES[int(rng.integers(len(OUTER_SHAPES)))]
    return SceneObject(colours[c1], shape_a), SceneObject(colours[c2], shape_b)


def scene_row(image_id: str, subject: SceneObject, obj: SceneObject, relation: str,
              boxes: tuple[tuple[int, ...], tuple[int, ...]], size: int) -> dict:
    caption = f"a {subject.label} {relation} a {obj.label}"
    converse = f"a {obj.label} {CONVERSE[relation]} a {subject.label}"
    return {"image": f"images/{image_id}.png", "image_id": image_id, "caption": caption, "captions": [caption, converse],
            "phrase": f"the {subject.label} and the {obj.label}",
            "subject": {"label": subject.label, "box": normalised(boxes[0], size)},
            "object": {"label": obj.label, "box": normalised(boxes[1], size)},
            "relation": relation, "key": meaning_key(subject.label, relation, obj.label)}


def make_split(folder: Path, n: int, eval_split: bool, size: int, rng: np.random.Generator, prefix: str) -> list[dict]:
    """n scenes whose meanings are held out (eval) or not (train); eval scenes each get a relation-swapped twin."""
    from colintern.testing.synthetic import png_bytes

    (folder / "images").mkdir(parents=True)
    rows: list[dict] = []
    while len(rows) < n * (2 if eval_split else 1):
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        subject, obj = pick_objects(relation, rng, both_outer=eval_split)
        if held_out(meaning_key(subject.label, relation, obj.label)) != eval_split:
            continue
        variants = [relation, CONVERSE[relation]] if eval_split else [relation]
        if eval_split and not held_out(meaning_key(subject.label, CONVERSE[relation], obj.label)):
            continue  # the twin's meaning must be held out too
        ids = [f"{prefix}_{len(rows) + j:05d}" for j in range(len(variants))]
        for j, rel in enumerate(variants):
            while True:  # the drawn boxes must satisfy the rule with its margins (they almost always do)
                image, boxes = render(subject, obj, place(rel, size, rng), rel, size)
                if relation_of(boxes[0], boxes[1]) == rel:
                    break
            (folder / "images" / f"{ids[j]}.png").write_bytes(png_bytes(image))
            row = scene_row(ids[j], subject, obj, rel, boxes, size)
            if eval_split:
                row["twin"] = ids[1 - j]
            rows.append(row)
    with (folder / "itr.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def generate(out: str | Path, n_train: int = 600, n_eval: int = 80, size: int = 224, seed: int = 0) -> dict:
    """Write OUT/train and OUT/eval (+ the manifest); returns the manifest."""
    out = Path(out)
    if n_train < 1 or n_eval < 1 or size < 64:
        raise UserError("--n_train and --n_eval must be at least 1 and --size at least 64")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise UserError(f"{out} exists and is not a colintern.itr.scenes output; choose a new directory")
    for name in ("train", "eval", MANIFEST):
        shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = make_split(out / "train", n_train, False, size, rng, "s")
    held = make_split(out / "eval", n_eval, True, size, rng, "e")
    manifest = {"n_train": len(train), "n_eval": len(held), "eval_twin_pairs": len(held) // 2, "size": size,
                "seed": seed, "relations": list(RELATIONS)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    config = parse_config(ScenesConfig, argv, __doc__, prog="python -m colintern.itr.model.scenes")
    manifest = generate(config.out, config.n_train, config.n_eval, config.size, config.seed)
    print(f"wrote {manifest['n_train']} training and {manifest['n_eval']} held-out scenes "
          f"({manifest['eval_twin_pairs']} twin pairs) to {config.out}")
    return 0


if __name__ == "__main__":
    from colintern.cli import run_cli

    sys.exit(run_cli(main))

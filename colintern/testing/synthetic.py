"""Deterministic synthetic page corpus for the embedded default (docs/CONTRACT.md §9).

Each page is a PIL drawing with a few LARGE, salient attributes -- a background colour, one big shape in a
second colour and one big word or number -- so that a tiny vision-language model can learn to retrieve it on a
CPU in minutes. Queries are short natural phrases naming at least two of the page's attributes.

    python -m colintern.testing.synthetic OUT [--n_train_pages 240 --n_eval_pages 60 --queries_per_page 3
                                       --seed 0 --page_size 224]

Writes (all deterministic for a given seed: byte-identical PNGs, identical rows, no timestamps):
    OUT/train/                  datasets.save_to_disk, vidore/colpali_train_set columns, several rows per page
    OUT/train_parquet/train-00000-of-00001.parquet           the same rows as one parquet file
    OUT/hub/colintern-synthetic/{README.md,data/train-00000-of-00001.parquet}   a hub-like repository folder
    OUT/eval/{corpus,queries,qrels}.jsonl + OUT/eval/images/  held-out BEIR-layout set (docs/CONTRACT.md §7)
    OUT/synthetic_manifest.json  arguments and every page's attributes (what tests and humans check against)

The eval pages are attribute combinations never used in train, drawn from the same vocabulary.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from colintern.cli import parse_config, run_cli, setup_logging
from colintern.settings import SyntheticConfig
from colintern.errors import UserError

log = logging.getLogger("colintern.testing.synthetic")

# Attribute vocabulary. RGB values are far apart so that colours stay distinct after resizing and blurring.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 40),
    "green": (30, 160, 60),
    "blue": (35, 75, 220),
    "purple": (140, 45, 180),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "stripes")
WORDS: tuple[str, ...] = (
    "alpha", "delta", "sigma", "omega", "tiger", "lemon",
    "piano", "river", "rocket", "maple", "42", "707",
)

# Query templates: (attributes named, pattern). b = background colour, c = shape colour, s = shape, w = word.
# Every template names at least two attributes.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("bcs", "{cs} on {b} page"),
    ("bcs", "{a_cs} drawn on {a_b} background"),
    ("bcs", "find the {b} page with {a_cs}"),
    ("bcs", "{b} page showing {a_cs}"),
    ("cs", "which page has {a_cs}?"),
    ("bs", "{b} page with {a_s}"),
    ("bw", "{b} background with {label}"),
    ("sw", "page with {a_s} and {label}"),
    ("csw", "{a_cs} next to {label}"),
    ("bcw", "{label} on {a_b} page beside {a_c} shape"),
    ("bsw", "{label} on {a_b} page with {a_s}"),
    ("bcsw", "{b} page, {cs}, {label}"),
    ("bcsw", "slide with {a_cs} and {label} on {a_b} background"),
    ("cw", "{label} next to {a_c} shape"),
)
MANIFEST = "synthetic_manifest.json"
HUB_NAME = "colintern-synthetic"
PARQUET_NAME = "train-00000-of-00001.parquet"
# Columns of vidore/colpali_train_set, in its order.
TRAIN_COLUMNS = ("image_filename", "image", "query", "answer", "source", "options", "page", "model", "prompt",
                 "answer_type")


@dataclass(frozen=True)
class PageSpec:
    """One synthetic page: its id, split, attributes and pixel size."""

    page_id: str
    split: str
    background: str
    colour: str
    shape: str
    word: str
    width: int
    height: int

    def attrs(self) -> dict[str, str]:
        """Attribute values keyed by the template letters."""
        return {"b": self.background, "c": self.colour, "s": self.shape, "w": self.word}


# ---------------------------------------------------------------- attributes and queries


def _phrases(page: PageSpec) -> dict[str, str]:
    """Text pieces the templates fill in ("a red circle", "red stripes", "the number 42", ...)."""
    plural = page.shape == "stripes"
    cs = f"{page.colour} {page.shape}"
    a_c = f"{'an' if page.colour[0] in 'aeiou' else 'a'} {page.colour}"
    a_cs = cs if plural else f"{a_c} {page.shape}"
    a_b = f"{'an' if page.background[0] in 'aeiou' else 'a'} {page.background}"
    a_s = page.shape if plural else f"a {page.shape}"
    label = f"the number {page.word}" if page.word.isdigit() else f"the word {page.word}"
    return {"b": page.background, "c": page.colour, "a_c": a_c, "a_b": a_b, "s": page.shape, "cs": cs, "a_cs": a_cs,
            "a_s": a_s, "label": label}


def describe(page: PageSpec) -> str:
    """A full one-line description of a page (the `answer` column)."""
    p = _phrases(page)
    return f"{p['a_cs']} on {p['a_b']} page with {p['label']}"


def _subset_key(page: PageSpec, subset: str) -> tuple[str, ...]:
    """The page's values of the attributes named by `subset` (template letters)."""
    values = page.attrs()
    return tuple(values[k] for k in subset)


def choose_pages(n_train: int, n_eval: int, seed: int, page_size: int) -> list[PageSpec]:
    """Pick attribute combinations: unique within each split, eval combinations disjoint from train.

    Within a split the (background, colour, shape) triple is kept unique while enough unused triples remain,
    so that most 3-attribute queries identify exactly one page.
    """
    rng = random.Random(seed)
    combos = [(b, c, s, w) for b in COLOURS for c in COLOURS if c != b for s in SHAPES for w in WORDS]
    if n_train + n_eval > len(combos):
        raise UserError(f"--n_train_pages + --n_eval_pages must be at most {len(combos)} (distinct attribute "
                        f"combinations), got {n_train + n_eval}")
    rng.shuffle(combos)
    used: set[int] = set()
    pages: list[PageSpec] = []
    for split, count in (("train", n_train), ("eval", n_eval)):
        picked: list[int] = []
        triples: set[tuple[str, str, str]] = set()
        for i, combo in enumerate(combos):  # first pass: unique triples
            if len(picked) == count:
                break
            if i not in used and combo[:3] not in triples:
                picked.append(i)
                triples.add(combo[:3])
        for i in range(len(combos)):  # second pass (large corpora only): any unused combination
            if len(picked) == count:
                break
            if i not in used and i not in picked:
                picked.append(i)
        used.update(picked)
        for i in picked:
            b, c, s, w = combos[i]
            width, height = _page_size(rng, page_size)
            pages.append(PageSpec(f"page_{len(pages):04d}", split, b, c, s, w, width, height))
    return pages


def _page_size(rng: random.Random, base: int) -> tuple[int, int]:
    """Mostly portrait pages (base wide, ~1.25-1.41x tall); about one in four landscape."""
    ratio = rng.choice((1.25, 1.34, 1.41))
    long_side = int(round(base * ratio))
    return (long_side, base) if rng.random() < 0.25 else (base, long_side)


def subset_counts(split_pages: list[PageSpec]) -> Counter:
    """How many pages of a split share each (template subset, attribute values) pair."""
    subsets = {subset for subset, _ in TEMPLATES}
    return Counter((subset, _subset_key(page, subset)) for page in split_pages for subset in subsets)


def make_queries(page: PageSpec, counts: Counter, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to n distinct (template, query) pairs for a page, preferring phrasings that match only this page.

    counts is subset_counts(pages of the split). A template is "unique" when no other page of the split shares
    the attribute values it names; 4-attribute templates always are (combinations are unique within a split).
    """
    order = list(range(len(TEMPLATES)))
    rng.shuffle(order)
    unique = [i for i in order if counts[(TEMPLATES[i][0], _subset_key(page, TEMPLATES[i][0]))] == 1]
    shared = [i for i in order if i not in unique]
    phrases = _phrases(page)
    return [(TEMPLATES[i][1], TEMPLATES[i][1].format(**phrases)) for i in (unique + shared)[:n]]


def matching_pages(subset: str, page: PageSpec, split_pages: list[PageSpec]) -> list[str]:
    """Ids of the pages of a split that a query naming `subset` of `page`'s attributes describes."""
    key = _subset_key(page, subset)
    return [p.page_id for p in split_pages if _subset_key(p, subset) == key]


# ---------------------------------------------------------------- drawing


def _text_colour(background: str) -> tuple[int, int, int]:
    """Black text on light backgrounds, white text on dark ones."""
    r, g, b = COLOURS[background]
    return (15, 15, 15) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (250, 250, 250)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """Linear blend of two RGB colours (t = weight of b)."""
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int],
                outline: tuple[int, int, int]) -> None:
    """Draw one big filled shape inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        inset = round(r * 0.12)
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=2)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill, outline=outline, width=2)
    elif shape == "cross":
        arm = r * 0.32
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    elif shape == "stripes":
        n = 4
        band = (y1 - y0) / (2 * n - 1)
        for k in range(n):
            top = y0 + 2 * k * band
            draw.rectangle((x0, round(top), x1, round(top + band)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _fit_font(text: str, max_width: int, max_height: int) -> ImageFont.FreeTypeFont | None:
    """The largest PIL default (FreeType) font that fits text in the box, or None without FreeType."""
    size = max_height
    while size > 8:
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):
            return None
        if not isinstance(font, ImageFont.FreeTypeFont):
            return None
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 - x0 <= max_width and y1 - y0 <= max_height:
            return font
        size -= 2
    return None


def _draw_word(image: Image.Image, text: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    """Draw text as large as fits, centred in box; without FreeType, scale up PIL's bitmap font (nearest)."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    font = _fit_font(text, width, height)
    draw = ImageDraw.Draw(image)
    if font is not None:
        bx0, by0, bx1, by1 = font.getbbox(text)
        x = x0 + (width - (bx1 - bx0)) / 2 - bx0
        y = y0 + (height - (by1 - by0)) / 2 - by0
        draw.text((round(x), round(y)), text, fill=colour, font=font)
        return
    bitmap = ImageFont.load_default()
    bx0, by0, bx1, by1 = bitmap.getbbox(text)
    small = Image.new("L", (int(bx1 - bx0 + 2), int(by1 - by0 + 2)), 0)
    ImageDraw.Draw(small).text((1 - bx0, 1 - by0), text, fill=255, font=bitmap)
    scale = max(1, min(width // small.width, height // small.height))
    mask = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    image.paste(colour, (x0 + (width - mask.width) // 2, y0 + (height - mask.height) // 2), mask)


def render_page(page: PageSpec, seed: int) -> Image.Image:
    """Draw a page: background, a few faint 'body text' lines, one big shape and one big word."""
    rng = random.Random(f"{seed}:{page.page_id}")
    w, h = page.width, page.height
    bg, fg, ink = COLOURS[page.background], COLOURS[page.colour], _text_colour(page.background)
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    # Shape in a square of ~55% of the short side; word band above or below it.
    side = int(min(w, h) * 0.55)
    word_h = int(min(w, h) * 0.24)
    gap = int(min(w, h) * 0.05)
    block_h = side + gap + word_h
    top = (h - block_h) // 2 + rng.randint(-h // 16, h // 16)
    left = (w - side) // 2 + rng.randint(-w // 16, w // 16)
    word_first = rng.random() < 0.5
    shape_y = top + word_h + gap if word_first else top
    word_y = top if word_first else top + side + gap
    # Faint body-text lines in the margins make pages look document-like without hiding the attributes.
    line_colour = _mix(bg, ink, 0.22)
    for y in range(8, h - 8, 11):
        if top - 6 <= y <= top + block_h + 6:
            continue
        length = rng.randint(w // 3, w - 20)
        draw.rectangle((10, y, 10 + length, y + 3), fill=line_colour)
    _draw_shape(draw, page.shape, (left, shape_y, left + side, shape_y + side), fg, _mix(fg, ink, 0.35))
    margin = w // 14
    _draw_word(image, page.word.upper(), (margin, word_y, w - margin, word_y + word_h), ink)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG with no metadata (byte-identical for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ---------------------------------------------------------------- writing


def _prepare_out(out: Path) -> None:
    """Create OUT, refusing to overwrite a non-empty directory that this module did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"{out} is not empty and is not a colintern.testing.synthetic output; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "train_parquet", "hub", "eval", MANIFEST):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _hub_readme() -> str:
    """Dataset card whose YAML config makes load_dataset(folder, split='train') find the parquet file."""
    features = "\n".join(
        f"  - name: {name}\n    dtype: {'image' if name == 'image' else 'string'}" for name in TRAIN_COLUMNS
    )
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: data/train-*\n"
        "dataset_info:\n"
        "  features:\n"
        f"{features}\n"
        "---\n\n"
        "# colintern-synthetic\n\n"
        "Synthetic pages (background colour, big shape, big word) with short attribute queries, in the\n"
        "`vidore/colpali_train_set` schema. Written by `python -m colintern.testing.synthetic`; deterministic per seed.\n"
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, stable key order."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_train_set(out: Path, train_pages: list, queries_per_page: int, seed: int, rng: random.Random):
    """The train set, several rows (queries) per page sharing image_filename, as a save_to_disk folder, a parquet
    file and a hub-style repository folder; returns (the dataset, the parquet file, the repository folder)."""
    import datasets  # heavy import, only needed here

    columns: dict[str, list] = {name: [] for name in TRAIN_COLUMNS}
    train_counts = subset_counts(train_pages)
    for page in train_pages:
        data = png_bytes(render_page(page, seed))
        filename = f"synthetic/{page.page_id}.png"
        for template, query in make_queries(page, train_counts, queries_per_page, rng):
            columns["image_filename"].append(filename)
            columns["image"].append({"bytes": data, "path": f"{page.page_id}.png"})
            columns["query"].append(query)
            columns["answer"].append(describe(page))
            columns["source"].append("synthetic")
            columns["options"].append(None)
            columns["page"].append("1")
            columns["model"].append("colintern.testing.synthetic")
            columns["prompt"].append(template)
            columns["answer_type"].append("attributes")
    features = datasets.Features({
        name: datasets.Image() if name == "image" else datasets.Value("string") for name in TRAIN_COLUMNS
    })
    train = datasets.Dataset.from_dict(columns, features=features, split=datasets.Split.TRAIN)
    parquet = out / "train_parquet" / PARQUET_NAME
    parquet.parent.mkdir(parents=True)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # 720 rows save in milliseconds; bars only clutter the log
    try:
        train.save_to_disk(str(out / "train"))
        train.to_parquet(str(parquet))
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    hub = out / "hub" / HUB_NAME
    (hub / "data").mkdir(parents=True)
    shutil.copyfile(parquet, hub / "data" / PARQUET_NAME)
    (hub / "README.md").write_text(_hub_readme(), encoding="utf-8")

    return train, parquet, hub


def write_eval_set(eval_dir: Path, eval_pages: list, seed: int, rng: random.Random) -> tuple[list, list]:
    """The BEIR-layout eval set, 1-2 queries per page; qrels list every eval page the query's attributes describe.
    Returns (queries, qrels)."""
    (eval_dir / "images").mkdir(parents=True)
    corpus: list[dict] = []
    queries: list[dict] = []
    qrels: list[dict] = []
    subset_of = {pattern: subset for subset, pattern in TEMPLATES}
    eval_counts = subset_counts(eval_pages)
    for page in eval_pages:
        (eval_dir / "images" / f"{page.page_id}.png").write_bytes(png_bytes(render_page(page, seed)))
        corpus.append({"corpus-id": page.page_id, "image": f"images/{page.page_id}.png"})
        n_queries = 1 + (rng.random() < 0.5)
        for template, query in make_queries(page, eval_counts, n_queries, rng):
            qid = f"q_{len(queries):04d}"
            queries.append({"query-id": qid, "query": query})
            for cid in matching_pages(subset_of[template], page, eval_pages):
                qrels.append({"query-id": qid, "corpus-id": cid, "score": 1})
    _write_jsonl(eval_dir / "corpus.jsonl", corpus)
    _write_jsonl(eval_dir / "queries.jsonl", queries)
    _write_jsonl(eval_dir / "qrels.jsonl", qrels)

    return queries, qrels


def generate(out_dir: str | Path, n_train_pages: int = 240, n_eval_pages: int = 60, queries_per_page: int = 3,
             seed: int = 0, page_size: int = 224) -> dict:
    """Write the synthetic train set (3 formats) and the BEIR eval set under out_dir; return a summary dict."""
    if n_train_pages < 1 or n_eval_pages < 1:
        raise UserError("--n_train_pages and --n_eval_pages must be at least 1")
    if not 1 <= queries_per_page <= len(TEMPLATES):
        raise UserError(f"--queries_per_page must be between 1 and {len(TEMPLATES)}, got {queries_per_page}")
    if not 64 <= page_size <= 4096:
        raise UserError(f"--page_size must be between 64 and 4096 pixels, got {page_size}")
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare_out(out)
    pages = choose_pages(n_train_pages, n_eval_pages, seed, page_size)
    train_pages = [p for p in pages if p.split == "train"]
    eval_pages = [p for p in pages if p.split == "eval"]
    rng = random.Random(f"{seed}:queries")

    train, parquet, hub = write_train_set(out, train_pages, queries_per_page, seed, rng)
    eval_dir = out / "eval"
    queries, qrels = write_eval_set(eval_dir, eval_pages, seed, rng)  # the same rng, after the train set's draws

    summary = {
        "args": {"n_train_pages": n_train_pages, "n_eval_pages": n_eval_pages,
                 "queries_per_page": queries_per_page, "seed": seed, "page_size": page_size},
        "train_rows": len(train), "train_pages": len(train_pages), "eval_pages": len(eval_pages),
        "eval_queries": len(queries), "eval_qrels": len(qrels),
        "paths": {"train": "train", "train_parquet": f"train_parquet/{PARQUET_NAME}",
                  "hub": f"hub/{HUB_NAME}", "eval": "eval"},
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "words": list(WORDS)},
        "pages": [asdict(p) for p in pages],
    }
    (out / MANIFEST).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log.info("synthetic corpus: %d train pages / %d rows -> %s (also %s, %s); %d eval pages / %d queries -> %s "
             "(%.1fs)", len(train_pages), len(train), out / "train", parquet, hub, len(eval_pages), len(queries),
             eval_dir, time.perf_counter() - start)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    config = parse_config(SyntheticConfig, argv, __doc__.split("\n\n")[0], prog="python -m colintern.testing.synthetic")
    setup_logging(config.verbose)
    generate(config.out, config.n_train_pages, config.n_eval_pages, config.queries_per_page, config.seed, config.page_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

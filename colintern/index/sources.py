"""What an index reads: the input files (PDFs and images, folders walked, unreadable entries reported), and PDF
pages rendered with pypdfium2 at a capped size."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from colintern.errors import UserError
from colintern.files import display


log = logging.getLogger("colintern.search")


# Largest PDF page bitmap rendered (pixels): A0 at 150 dpi is 35 Mpx; pages are resized to the model's tiles anyway.
MAX_RENDER_PIXELS = 64_000_000


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass(frozen=True)
class PageSource:
    """One page to index: a PDF page (1-based) or an image file (page 1)."""

    file: str       # absolute path
    sha256: str     # of the file's bytes: the page's identity, with `page`
    page: int
    kind: str       # "pdf" | "image"


def find_inputs(inputs: list[str]) -> list[Path]:
    """PDFs and images named directly or found under folders (sorted); one line for a path that is neither, a
    warning for a subfolder that cannot be read (its files would be missing in silence otherwise)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found, unreadable = walk_pages(path)
            for folder, reason in unreadable:
                if folder == path:
                    raise UserError(f"--inputs {display(name)}: cannot read this folder ({reason})")
                log.warning("%s: cannot read this folder (%s); its files are not indexed", display(folder), reason)
            if not found:
                raise UserError(f"--inputs {display(name)}: no PDF or image files in this folder")
            files += found
        elif path.is_file():
            if path.suffix.lower() != ".pdf" and path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"--inputs {display(name)}: not a PDF or an image ({path.suffix or 'no extension'}); "
                                f"search.py indexes .pdf and {', '.join(IMAGE_SUFFIXES)} files")
            files.append(path)
        else:
            raise UserError(f"--inputs {display(name)}: no such file or folder")
    return [p.resolve() for p in dict.fromkeys(files)]


def walk_pages(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(PDF and image files under root, sorted; [(folder, reason)] for each folder that could not be listed)."""
    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            unreadable.append((folder, (err.strerror or str(err)).lower()))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                pending.append(path)
            elif entry.is_file() and (path.suffix.lower() == ".pdf" or path.suffix.lower() in IMAGE_SUFFIXES):
                found.append(path)
    return sorted(found), sorted(unreadable)


def pdf_page_count(path: Path) -> int:
    """Pages of a PDF; UserError-free: raises ValueError with the reason for an unreadable one."""
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        reason = str(err)
        if "password" in reason.lower():
            raise ValueError("encrypted PDF (needs a password)") from None
        raise ValueError(f"not a readable PDF ({reason})") from None
    try:
        return len(document)
    finally:
        document.close()


def render_page(source: PageSource, dpi: int) -> Image.Image:
    """The page as an RGB image: a PDF page rendered at `dpi`, or the image file decoded (any PIL mode)."""
    from colintern.data.images import decode_image

    if source.kind == "image":
        return decode_image(source.file, source.file)
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(source.file)
    try:
        page = document[source.page - 1]
        width, height = page.get_size()  # points (1/72 inch)
        scale = render_scale(width, height, dpi)
        if scale < dpi / 72:
            log.warning("%s page %d is %.0f x %.0f in: rendered at %.0f dpi instead of %d to stay under %d Mpx",
                        display(source.file), source.page, width / 72, height / 72, scale * 72, dpi,
                        MAX_RENDER_PIXELS // 1_000_000)
        return page.render(scale=scale).to_pil().convert("RGB")
    finally:
        document.close()


def render_scale(width_pt: float, height_pt: float, dpi: int) -> float:
    """pdfium's scale for a page of that size at `dpi`, lowered so the bitmap stays under MAX_RENDER_PIXELS (a
    200 x 200 inch page at 150 dpi would otherwise need 900 Mpx, several GB)."""
    scale = dpi / 72
    pixels = width_pt * height_pt * scale * scale
    if pixels > MAX_RENDER_PIXELS:
        scale *= (MAX_RENDER_PIXELS / pixels) ** 0.5
    return scale

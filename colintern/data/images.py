"""Decoding page images from any of the forms datasets hold (bytes, {bytes, path} dicts, paths, PIL images),
with one-line errors for undecodable and oversized images."""
from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from colintern.backbones.processor import PageModeError, page_size_note, page_size_problem, to_rgb  # one rule for the API and the batch jobs
from colintern.data.report import BadRowError


log = logging.getLogger("colintern.data.datasets")


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header, or None if data is not a PNG (used to name 0x0 PNGs PIL rejects)."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _read_source(value: Any, where: str) -> bytes:
    """The encoded image bytes behind a datasets {"bytes","path"} dict, raw bytes or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _read_source(value["path"], where)
        raise BadRowError(where, "missing image: no bytes and no path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRowError(where, "missing image: empty bytes")
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise BadRowError(where, f"missing image: file not found: {path}")
        try:
            return path.read_bytes()
        except OSError as err:
            raise BadRowError(where, f"missing image: cannot read {path}: {err.strerror or err}") from None
    raise BadRowError(where, f"missing image: unsupported image value of type {type(value).__name__}")


def _check_size(width: int, height: int, where: str) -> None:
    problem = page_size_problem(width, height)
    if problem:
        raise BadRowError(where, problem)


def _note_size(width: int, height: int, where: str) -> None:
    note = page_size_note(width, height)
    if note:
        log.warning("%s: %s", where, note)


def decode_image(value: Any, where: str) -> Image.Image:
    """Decode a page image to RGB; BadRowError(where, reason) for missing, corrupt, truncated, empty or extreme images.

    value: a datasets {"bytes", "path"} dict, a PIL image, raw encoded bytes or a file path.
    """
    if value is None:
        raise BadRowError(where, "missing image: no image value")
    if isinstance(value, Image.Image):
        _check_size(value.width, value.height, where)
        _note_size(value.width, value.height, where)
        try:
            return to_rgb(value)
        except PageModeError as err:
            raise BadRowError(where, str(err)) from None
    data = _read_source(value, where)
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: said once, in our words (_note_size)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.width, image.height, where)  # from the header: reject before decoding pixels
                _note_size(image.width, image.height, where)
                image.load()
                return to_rgb(image)
    except BadRowError:
        raise
    except PageModeError as err:
        raise BadRowError(where, str(err)) from None
    except Image.DecompressionBombError as err:
        raise BadRowError(where, f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        size = _png_size(data)
        if size is not None and 0 in size:
            raise BadRowError(where, f"empty image: {size[0]}x{size[1]} pixels") from None
        raise BadRowError(where, f"corrupt image: not a recognised image format ({len(data)} bytes)") from None
    except OSError as err:
        if "truncated" in str(err).lower():
            raise BadRowError(where, f"truncated image: {err} ({len(data)} bytes)") from None
        raise BadRowError(where, f"corrupt image: {err}") from None
    except (SyntaxError, ValueError, EOFError, struct.error, IndexError) as err:
        raise BadRowError(where, f"corrupt image: {type(err).__name__}: {err}") from None


def image_bytes(value: Any, where: str = "image") -> bytes:
    """Bytes identifying an image value (encoded bytes, or raw pixels for a PIL image), for hashing."""
    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    return _read_source(value, where)

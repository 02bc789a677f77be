"""Text baselines in eval.py, as in the ViDoRe paper's tables: the same local page set scored by its text alone.

    python eval.py --local_dataset data/mine/eval --baseline bm25 --run_name bm25
    python eval.py --local_dataset data/mine/eval --baseline text:FOLDER_OR_HUB_ID --run_name minilm

A page's text is its corpus row's "text" (make_dataset writes the PDF's own text layer there); a page without any
is read by OCR (Tesseract through pytesseract), once: the text is cached, with its checksum, as
OUT_DIR/ocr/<sha256 of the image>.json.
bm25: mteb's own BM25 baseline (mteb/baseline-bm25s: bm25s with English stemming and stopwords). text:MODEL: any
sentence-transformers text model, cosine similarity. Both go through the same mteb evaluator and summary.json as a
ColIntern model, so plot_vidore_metrics.py and the eval.py table put them beside it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from colintern.errors import UserError
from colintern.files import atomic_write_text

log = logging.getLogger("colintern.eval")
BM25_MODEL = "mteb/baseline-bm25s"


def check_baseline(spec: str) -> None:
    if spec != "bm25" and not (spec.startswith("text:") and len(spec) > 5):
        raise UserError(f"--baseline {spec!r}: use bm25 or text:MODEL (a sentence-transformers model)")


def text_fields(folder: Path) -> dict[str, str]:
    """corpus-id -> "text" of a BEIR folder's corpus.jsonl rows that have one (other layouts: none)."""
    path = folder / "corpus.jsonl"
    if not path.is_file():
        return {}
    texts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        cid = str(row.get("corpus-id", row.get("_id", row.get("id", ""))))
        if isinstance(row.get("text"), str) and row["text"].strip():
            texts[cid] = row["text"]
    return texts


def ocr(image: Any, cache: Path) -> str:
    """Tesseract's text of a page image (PIL), cached by the image's sha256 as {"text", "sha256" of the text}: a
    damaged cache file is read again by OCR, never used."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    key = hashlib.sha256(buffer.getvalue()).hexdigest()
    cached = cache / f"{key}.json"
    try:
        entry = json.loads(cached.read_text(encoding="utf-8"))
        if hashlib.sha256(entry["text"].encode()).hexdigest() == entry["sha256"]:
            return str(entry["text"])
        log.warning("%s is damaged: reading the page again", cached)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is damaged: reading the page again", cached)
    try:
        import pytesseract

        text = pytesseract.image_to_string(image.convert("RGB"))
    except ImportError:
        raise UserError("a page has no text: OCR needs pytesseract (pip install pytesseract) and Tesseract "
                        "(apt install tesseract-ocr)") from None
    except Exception as err:  # noqa: BLE001 - pytesseract wraps a missing binary and its failures in its own types
        raise UserError(f"a page has no text and Tesseract failed on it: {err}; install tesseract-ocr") from None
    atomic_write_text(cached, json.dumps({"text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}))
    return text


def text_task(path: str, cache: Path) -> tuple[Any, int]:
    """The local BEIR set as a text-to-text mteb task (pages replaced by their text), and how many pages were OCR'd."""
    import datasets

    from colintern.eval.evaluation import local_task

    task = local_task(path)
    read = 0
    for subset, splits in task.dataset.items():
        folder = Path(path) if subset == "default" else Path(path) / subset
        fields = text_fields(folder)
        corpus = splits["test"]["corpus"]
        texts = []
        for cid, image in zip(corpus["id"], corpus["image"]):
            if cid in fields:
                texts.append(fields[cid])
            else:
                texts.append(ocr(image, cache))
                read += 1
        splits["test"]["corpus"] = datasets.Dataset.from_dict({"id": list(corpus["id"]), "text": texts})
    task.metadata = task.metadata.model_copy(update={"category": "t2t", "modalities": ["text"]})
    return task, read


class Baseline:
    """An mteb model (BM25 search or a sentence-transformers encoder) with the attributes eval.py's summary reads."""

    def __init__(self, spec: str):
        import mteb

        check_baseline(spec)
        self.model_id, self.dtype, self.device, self.config = spec, "float32", "cpu", {"baseline": spec}
        if spec == "bm25":
            self.mteb_model_meta = mteb.get_model_meta(BM25_MODEL)
            self.mteb_model = self.mteb_model_meta.load_model()
        else:
            from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

            self.mteb_model = SentenceTransformerEncoderWrapper(spec[5:])
            self.mteb_model_meta = self.mteb_model.mteb_model_meta

"""Image-text retrieval with contrastive, matching, box and relation heads over a frozen VLM (seed 004, §12).

    frozen backbone (InternVL or Qwen3-VL, any family of colintern.backbones.registry)   one forward per image and text, cached
      image: a fixed square resize, one tile -> the LM hidden states of its image tokens (a fixed layout)
      text : caption / phrase -> the hidden states of its real tokens
    ITC    mean-pooled tokens -> Linear(H, dim) per modality -> L2; learned temperature (clamped)
    FUSION caption (or phrase) tokens, after a learned [FUSE] token, attend to the image tokens (+ a learned position
           per image token) through Transformer decoder layers; the [FUSE] output is the fused vector (B, d)
    HEADS  itm Linear(d, 2) · box MLP(d, d, 8): subject + object (sigmoid cx, cy, w, h) · relation Linear(d, 6)

Why not the seed's literal design (docs/DESIGN.md "Seed 004"): token 0 of a causal LM is the same vector for every
caption (pooled tokens instead); a linear ITM over two independently encoded vectors ranks images the same for every
caption (a fused representation instead, trained on hard negatives); box and relation heads read a relation-free
phrase ("the red circle and the blue square") so they must look at the image.

Public API:
    m = ImageText.from_pretrained(model_id, ckpt)   # ckpt: an itr checkpoint of train.py --task itr
    m.encode_images(pils) / m.encode_texts(texts)   # (N, dim) unit vectors
    m.match(pils, texts)                            # (N,) ITM probability of aligned pairs
    m.ground(pils, phrases)                         # subject/object boxes (N, 4) and relation probabilities (N, 6)
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from colintern.errors import UserError
from colintern.itr.losses import box_from_raw
from colintern.itr.scenes import RELATIONS

log = logging.getLogger("colintern.itr.model")


@dataclass
class ItrConfig:
    """What the heads are and how their inputs are made; saved in every itr checkpoint."""
    dim: int = 256                 # ITC vector size
    fusion_dim: int = 256
    fusion_layers: int = 2
    fusion_heads: int = 4
    image_size: int = 0            # images are resized to this square (a fixed token layout); 0: the tile size
    max_tiles: int = 1             # InternVL tiles of that square (4: 2 x 2 + a thumbnail; the tiny model uses it)
    image_tokens: int = 0          # image tokens per image at that size (measured when the model is built)
    temp_init: float = 0.07
    temp_bounds: tuple[float, float] = (0.001, 0.5)
    relations: list[str] = field(default_factory=lambda: list(RELATIONS))
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["temp_bounds"] = list(self.temp_bounds)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ItrConfig":
        return cls(**{**d, "temp_bounds": tuple(d["temp_bounds"])})


# ------------------------------------------------------------------------------------------------ data


@dataclass
class ItrRow:
    """One image with its captions and (optionally) the grounding of its two objects."""
    image: str                        # absolute path
    image_id: str
    captions: list[str]
    key: str                          # the meaning: rows (and captions) with the same key describe each other
    phrase: str | None = None
    subject_box: list[float] | None = None
    object_box: list[float] | None = None
    relation: int | None = None       # index into RELATIONS
    twin: str | None = None


def read_itr_jsonl(path: str | Path, report: Any) -> list[ItrRow]:
    """Rows of an itr.jsonl file (docs/CONTRACT.md §12); a bad row is reported "FILE line N: reason" and skipped."""
    from colintern.data.report import BadRowError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: {err.strerror}") from None
    rows = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            try:
                item = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRowError(where, "not valid UTF-8") from None
            except json.JSONDecodeError as err:
                raise BadRowError(where, f"not JSON ({err.msg})") from None
            rows.append(_row(item, path.parent, where))
        except BadRowError as err:
            report.add_error(err)
    if not rows:
        raise UserError(f"{path}: no usable row ({report.summary()})")
    return rows


def read_coco(captions_json: str | Path, images_dir: str | Path, report: Any,
              instances_json: str | Path | None = None) -> list[ItrRow]:
    """COCO captions (+ optionally instances) as rows: one per image with all its captions (they describe each
    other: the image id is the key); with instances, the two largest boxes become subject and object ([x, y, w, h]
    pixels normalised by the image size) and the phrase names their categories. COCO labels no spatial relation, so
    rows carry none (the relation loss skips them). A caption of an unknown image is reported and skipped."""
    def load(path: str | Path) -> dict:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable COCO annotation file ({err})") from None

    data = load(captions_json)
    try:
        images = {im["id"]: im for im in data["images"]}
        captions: dict[Any, list[str]] = {}
        for n, ann in enumerate(data["annotations"]):
            if ann.get("image_id") not in images or not str(ann.get("caption", "")).strip():
                report.add(f"{captions_json} annotation {n}", "caption of an unknown image, or empty")
                continue
            captions.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    except (KeyError, TypeError) as err:
        raise UserError(f"{captions_json}: missing COCO field {err}") from None
    boxes: dict[Any, list[tuple[float, list[float], str]]] = {}
    if instances_json:
        inst = load(instances_json)
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for ann in inst.get("annotations", []):
            im = images.get(ann.get("image_id"))
            if im is None:
                continue
            x, y, w, h = ann["bbox"]
            box = [x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"]]
            boxes.setdefault(ann["image_id"], []).append((w * h, box, names.get(ann.get("category_id"), "object")))
    rows = []
    for image_id, texts in captions.items():
        path = Path(images_dir) / images[image_id]["file_name"]
        if not path.is_file():
            report.add(f"{captions_json} image {image_id}", f"missing image: file not found: {path}")
            continue
        two = sorted(boxes.get(image_id, []), key=lambda t: -t[0])[:2]
        rows.append(ItrRow(image=str(path.resolve()), image_id=str(image_id), captions=texts, key=f"coco:{image_id}",
                           phrase=f"the {two[0][2]} and the {two[1][2]}" if len(two) == 2 else None,
                           subject_box=two[0][1] if len(two) == 2 else None,
                           object_box=two[1][1] if len(two) == 2 else None))
    if not rows:
        raise UserError(f"{captions_json}: no usable image ({report.summary()})")
    return rows


def read_rows(path: str | Path, report: Any, coco_images: str | None = None,
              coco_instances: str | None = None) -> list[ItrRow]:
    """An itr.jsonl file (or a folder holding one), or a COCO captions JSON with --coco_images."""
    path = Path(path)
    if path.is_dir():
        path = path / "itr.jsonl"
    if path.suffix == ".json":
        if not coco_images:
            raise UserError(f"{path} is a COCO annotation file: also pass --coco_images DIR (its images)")
        return read_coco(path, coco_images, report, coco_instances)
    return read_itr_jsonl(path, report)


def _row(item: Any, base: Path, where: str) -> ItrRow:
    from colintern.data.report import BadRowError

    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise BadRowError(where, 'needs "image" (a path) and "caption"')
    captions = item.get("captions") or ([item["caption"]] if isinstance(item.get("caption"), str) else [])
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise BadRowError(where, 'needs a non-empty "caption" (or "captions")')
    image = base / item["image"]
    if not image.is_file():
        raise BadRowError(where, f"missing image: file not found: {image}")
    relation = item.get("relation")
    if relation is not None and relation not in RELATIONS:
        raise BadRowError(where, f"unknown relation {relation!r} (one of {', '.join(RELATIONS)})")
    boxes = []
    for part in ("subject", "object"):
        box = (item.get(part) or {}).get("box")
        if box is not None and (len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[2] < box[0]
                                or box[3] < box[1]):
            raise BadRowError(where, f"{part} box {box} is not [x1, y1, x2, y2] within [0, 1]")
        boxes.append(box)
    return ItrRow(image=str(image.resolve()), image_id=str(item.get("image_id", item["image"])), captions=captions,
                  key=str(item.get("key", captions[0])), phrase=item.get("phrase"), subject_box=boxes[0],
                  object_box=boxes[1], relation=None if relation is None else RELATIONS.index(relation),
                  twin=item.get("twin"))


# ------------------------------------------------------------------------------------------------ model


class FusionEncoder(nn.Module):
    """Text tokens (after a learned [FUSE] token) attend to image tokens; returns the [FUSE] output."""

    def __init__(self, hidden: int, d: int, layers: int, heads: int, image_tokens: int):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(hidden, d), nn.Linear(hidden, d)
        self.position = nn.Parameter(torch.randn(image_tokens, d) * 0.02)  # (n_img, d)
        self.fuse = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(d)

    def forward(self, image: torch.Tensor, text: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """image (B, n_img, H), text (B, L, H), keep (B, L) bool -> (B, d)."""
        b = image.shape[0]
        memory = self.img_in(image) + self.position  # (B, n_img, d)
        tokens = torch.cat([self.fuse.expand(b, 1, -1), self.txt_in(text)], 1)  # (B, 1 + L, d)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=keep.device), ~keep], 1)  # True = ignore
        return self.norm(self.decoder(tokens, memory, tgt_key_padding_mask=pad)[:, 0])


class ItrHeads(nn.Module):
    """Everything trainable of seed 004 on top of the frozen backbone (float32)."""

    def __init__(self, hidden: int, cfg: ItrConfig):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.img_proj, self.txt_proj = nn.Linear(hidden, cfg.dim), nn.Linear(hidden, cfg.dim)
            self.temperature = nn.Parameter(torch.tensor(float(cfg.temp_init)))
            self.fusion = FusionEncoder(hidden, cfg.fusion_dim, cfg.fusion_layers, cfg.fusion_heads, cfg.image_tokens)
            self.itm = nn.Linear(cfg.fusion_dim, 2)
            self.box = nn.Sequential(nn.Linear(cfg.fusion_dim, cfg.fusion_dim), nn.GELU(), nn.Linear(cfg.fusion_dim, 8))
            self.relation = nn.Linear(cfg.fusion_dim, len(cfg.relations))

    def image_vectors(self, image: torch.Tensor) -> torch.Tensor:
        """(B, n_img, H) -> (B, dim) unit vectors (mean over the image tokens)."""
        return F.normalize(self.img_proj(image.mean(1)), dim=-1)

    def text_vectors(self, text: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, L, H), (B, L) -> (B, dim) unit vectors (mean over the real tokens)."""
        k = keep.unsqueeze(-1).to(text.dtype)
        return F.normalize(self.txt_proj((text * k).sum(1) / k.sum(1).clamp_min(1)), dim=-1)

    def ground(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, d) -> subject boxes (B, 4), object boxes (B, 4), relation logits (B, n_rel)."""
        raw = self.box(fused)
        return box_from_raw(raw[:, :4]), box_from_raw(raw[:, 4:]), self.relation(fused)


class Features:
    """Frozen-backbone hidden states: images as (N, n_img, H), texts as padded (N, L, H) with a keep mask."""

    def __init__(self, model: Any, cfg: ItrConfig):
        self.model, self.cfg = model, cfg

    def square(self, image: Image.Image) -> Image.Image:
        from colintern.backbones.processor import to_rgb

        return to_rgb(image).resize((self.cfg.image_size, self.cfg.image_size), Image.Resampling.BICUBIC)

    def count_image_tokens(self) -> int:
        return int(self.model.processor.page_cost(self.square(Image.new("RGB", (8, 8), "white"))))

    def images(self, images: Sequence[Image.Image], batch_size: int = 16, grad: bool = False) -> torch.Tensor:
        """(N, n_img, H) image-token states; with grad (LoRA training) the graph is kept and nothing leaves the
        device."""
        out = []
        n = self.cfg.image_tokens
        with torch.set_grad_enabled(grad):
            for s in range(0, len(images), batch_size):
                inputs = self.model.processor.process_images([self.square(im) for im in images[s:s + batch_size]])
                hidden = self.model.hidden_states(inputs).float()  # (b, L, H)
                keep = inputs["keep_mask"].to(hidden.device)
                for h, k in zip(hidden, keep):
                    tokens = h[k][:n]  # the image tokens come first among the kept ones
                    if len(tokens) != n:
                        raise UserError(f"an image gave {len(tokens)} image tokens, the heads expect {n}: the "
                                        "checkpoint was trained with another image size or backbone")
                    out.append(tokens if grad else tokens.cpu())
            return torch.stack(out)  # (N, n_img, H)

    def texts(self, texts: Sequence[str], batch_size: int = 64, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, H) token states (zero on padding) and (N, L) keep mask."""
        from colintern.train.step import pad_cat

        parts = []
        with torch.set_grad_enabled(grad):
            for s in range(0, len(texts), batch_size):
                inputs = self.model.processor.process_queries(list(texts[s:s + batch_size]))
                hidden = self.model.hidden_states(inputs).float()  # (b, L, H)
                keep = inputs["keep_mask"].to(hidden.device)
                if not grad:
                    hidden, keep = hidden.cpu(), keep.cpu()
                parts.append((hidden * keep.unsqueeze(-1), keep))
            return pad_cat(parts)  # (N, Lmax, H), (N, Lmax)


def load_backbone_for_itr(model_id: str, cfg: ItrConfig, device: str):
    """The frozen ColIntern backbone with cfg.max_tiles tiles per image, and cfg with its image-token count."""
    from colintern.retriever.model import ColIntern

    model = ColIntern.from_pretrained(model_id, device=device, max_tiles=cfg.max_tiles)
    model.backbone.requires_grad_(False)
    model.eval()
    if not cfg.image_size:  # one tile, or 2 x 2 tiles (+ the thumbnail) with max_tiles 4
        cfg.image_size = model.config.tile_size * (2 if cfg.max_tiles > 1 else 1)
    tokens = Features(model, cfg).count_image_tokens()
    if cfg.image_tokens and cfg.image_tokens != tokens:
        raise UserError(f"this backbone gives {tokens} image tokens per {cfg.image_size}-px image; the checkpoint's "
                        f"heads were trained with {cfg.image_tokens}: use the checkpoint's base model")
    cfg.image_tokens = tokens
    return model, cfg


def open_images(rows: Sequence[ItrRow], workers: int = 0) -> list[Image.Image]:
    """Every row's image, decoded to RGB (the files are closed again), in row order; `workers` > 0 decodes in that
    many threads (PIL releases the GIL while decoding)."""
    def decode(row: ItrRow) -> Image.Image:
        with Image.open(row.image) as im:
            return im.convert("RGB")

    if workers <= 0:
        return [decode(row) for row in rows]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(decode, rows))


def restore_lora(model: Any, lora: dict[str, Any]) -> None:
    """Attach the LoRA adapters a checkpoint holds ({"config", "state"}) to the backbone."""
    model.add_lora(**lora["config"])
    model.load_lora_state(lora["state"])


class ImageText:
    """A trained seed-004 model: frozen backbone + heads from an itr checkpoint (+ the checkpoint's base model and
    mean training boxes, for evaluation)."""

    def __init__(self, model: Any, cfg: ItrConfig, heads: ItrHeads, base_model: str = "",
                 box_prior: dict[str, list[float]] | None = None):
        self.model, self.cfg, self.heads = model, cfg, heads.eval()
        self.base_model, self.box_prior = base_model, box_prior
        self.features = Features(model, cfg)

    @classmethod
    def from_pretrained(cls, model_id: str | None, ckpt: str, device: str = "cpu") -> "ImageText":
        from colintern.retriever.checkpoint import base_model_of, load_checkpoint

        payload = load_checkpoint(ckpt, task="itr")
        cfg = ItrConfig.from_dict(payload["itr"])
        model, cfg = load_backbone_for_itr(model_id or base_model_of(payload, ckpt), cfg, device)
        if payload.get("lora"):  # trained with --lora: the backbone's adapters too
            restore_lora(model, payload["lora"])
            model.eval()
        heads = ItrHeads(model.config.hidden_size, cfg)
        heads.load_state_dict(payload["itr_heads"])
        return cls(model, cfg, heads, payload["config"]["base_model"], payload.get("box_prior"))

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.heads.image_vectors(self.features.images(images))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.heads.text_vectors(*self.features.texts(texts))

    @torch.no_grad()
    def match(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        text, keep = self.features.texts(texts)
        fused = self.heads.fusion(self.features.images(images), text, keep)
        return torch.softmax(self.heads.itm(fused), -1)[:, 1]

    @torch.no_grad()
    def ground(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> dict[str, Any]:
        text, keep = self.features.texts(phrases)
        subject, obj, logits = self.heads.ground(self.heads.fusion(self.features.images(images), text, keep))
        probs = torch.softmax(logits, -1)
        return {"subject_box": subject, "object_box": obj, "relation_probs": probs,
                "relation": [self.cfg.relations[i] for i in probs.argmax(-1).tolist()]}

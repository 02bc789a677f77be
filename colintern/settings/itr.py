"""train.py --task itr's settings (seed 004's image-text heads)."""
from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass

from colintern.errors import UserError
from colintern.cli import Options, option, with_default
from colintern.settings.common import DeviceOptions, LogOptions, ModelOptions
from colintern.settings.train import LoraOptions, OptimOptions, TrainDataOptions, TrainOutputOptions


ITR_STAGES = ("1", "2", "single")


ITR_LOSS_WEIGHTS = {"itc": 1.0, "itm": 1.0, "box_l1": 0.1, "box_giou": 0.1, "rel": 0.1}  # the seed's (GIoU added)


@dataclass(frozen=True, kw_only=True)
class CocoOptions(Options):
    """COCO captions"""

    coco_images: str | None = option(None, help="with a COCO captions JSON as --train_itr or --itr_dataset: its image "
                                                "folder")
    coco_instances: str | None = option(None, help="with a COCO captions JSON: its instances JSON (the two largest "
                                                   "boxes give the box targets; COCO has no relation labels)")


@dataclass(frozen=True, kw_only=True)
class ItrHeadOptions(Options):
    """image-text heads (seed 004)"""

    train_itr: str = option(help="rows {image, caption(s), phrase, subject, object, relation} (docs/CONTRACT.md §12), "
                                 "e.g. python -m colintern.itr.scenes OUT writes OUT/train/itr.jsonl; or a COCO captions "
                                 "JSON (with --coco_images)")
    stage: str = option("single", choices=ITR_STAGES, help="1: ITC only; 2: every loss, from a stage-1 --resume_ckpt; "
                                                          "single: every loss from step 1")
    loss_weights: str = option("itc=1,itm=1,box_l1=0.1,box_giou=0.1,rel=0.1",
                               help="weights of the stage's losses (default: itc=1,itm=1,box_l1=0.1,box_giou=0.1,"
                                    "rel=0.1, the seed's with GIoU added)")
    itm_negatives: str = option("hard", choices=("hard", "random"), help="ITM negatives drawn from the ITC softmax "
                                                                        "(ALBEF/BLIP) or uniformly")
    temp_init: float = option(0.07, help="initial ITC temperature")
    temp_bounds: str = option("0.001,0.5", help="the temperature is clamped to LOW,HIGH after every step (default: "
                                                "0.001,0.5)")
    fusion_dim: int = option(256, at_least=1, help="fusion width")
    fusion_layers: int = option(2, at_least=1, help="fusion decoder layers")
    fusion_heads: int = option(4, at_least=1, help="fusion attention heads")
    image_size: int | None = option(None, at_least=1, help="images are resized to this square (default: the "
                                                          "backbone's tile size)")

    @functools.cached_property  # parsed once (check() does it), not at every training step
    def weights(self) -> dict[str, float]:
        """--loss_weights as {loss: weight}, the unnamed ones at the seed's values."""
        weights = dict(ITR_LOSS_WEIGHTS)
        for item in filter(None, self.loss_weights.split(",")):
            name, _, value = item.partition("=")
            if name not in weights:
                raise UserError(f"--loss_weights: unknown loss {name!r} (one of {', '.join(weights)})")
            try:
                weights[name] = float(value)
            except ValueError:
                raise UserError(f"--loss_weights: {item!r} is not NAME=NUMBER") from None
        return weights

    @functools.cached_property
    def temp_range(self) -> tuple[float, float]:
        try:
            low, high = (float(v) for v in self.temp_bounds.split(","))
        except ValueError:
            raise UserError(f"--temp_bounds {self.temp_bounds!r}: expected LOW,HIGH") from None
        if not 0 < low < high:
            raise UserError(f"--temp_bounds {self.temp_bounds}: need 0 < LOW < HIGH")
        return low, high

    def check(self) -> None:
        _ = (self.weights, self.temp_range)  # parsed now: a bad value stops before any work


@dataclass(frozen=True, kw_only=True)
class ItrTrainConfig(ItrHeadOptions, CocoOptions, LogOptions):
    """Everything one phase of seed-004 training needs (train.py --task itr's flags)."""

    model_id: str = with_default(ModelOptions, "model_id", MISSING)
    dim: int = with_default(TrainDataOptions, "dim", 256)
    max_tiles: int = with_default(TrainDataOptions, "max_tiles", 1)
    strict: bool = with_default(TrainDataOptions, "strict", False)
    epochs: int = with_default(OptimOptions, "epochs", 6)
    max_steps: int = with_default(OptimOptions, "max_steps", 0)
    batch_size: int = with_default(OptimOptions, "batch_size", 32)
    lr: float = with_default(OptimOptions, "lr", 1e-4)
    weight_decay: float = with_default(OptimOptions, "weight_decay", 0.01)
    warmup_ratio: float = with_default(OptimOptions, "warmup_ratio", 0.1)
    seed: int = with_default(OptimOptions, "seed", 0)
    lora: bool = with_default(LoraOptions, "lora", False)
    lora_r: int = with_default(LoraOptions, "lora_r", 16)
    lora_alpha: int = with_default(LoraOptions, "lora_alpha", 32)
    out_dir: str = with_default(TrainOutputOptions, "out_dir", "outputs/itr")
    save_every: int = with_default(TrainOutputOptions, "save_every", 0)
    resume_ckpt: str | None = with_default(TrainOutputOptions, "resume_ckpt", None)
    overwrite: bool = with_default(TrainOutputOptions, "overwrite", False)
    report_to: list[str] = with_default(TrainOutputOptions, "report_to", ["none"])
    device: str = with_default(DeviceOptions, "device", "auto")
    threads: int | None = with_default(DeviceOptions, "threads", None)
    num_workers: int = with_default(DeviceOptions, "num_workers", 0)

    def check(self) -> None:
        if self.batch_size < 2:
            raise UserError("--batch_size must be at least 2: the contrastive loss needs in-batch negatives")
        if self.stage == "2" and not self.resume_ckpt:
            raise UserError("--stage 2 starts from a stage-1 checkpoint: pass --resume_ckpt (or use --stage single)")

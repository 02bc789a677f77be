"""colpali-engine's ColQwen2.5, ColQwen3 and ColIdefics3 (ColSmol) restated from its source, for
tests/test_colpali_engine.py (colpali-engine itself cannot be imported here: it needs torchvision).

Restated from illuin-tech/colpali at 9be8f19:
- colpali_engine/models/qwen2_5/colqwen2_5/modeling_colqwen2_5.py and qwen3/colqwen3/modeling_colqwen3.py: the Qwen
  VL model itself plus `custom_text_proj` (128 / 320 dims); forward un-pads pixel_values by image_grid_thw, takes
  last_hidden_state, projects, divides by the norm and multiplies by attention_mask.
- colpali_engine/models/idefics3/colidefics3/modeling_colidefics3.py: `self.model` (Idefics3Model) plus `linear`
  (128 dims), the same projection and masking.
- processing_colqwen2_5.py, processing_colqwen3.py, processing_colidefics3.py and utils/processing_utils.py: left
  padding; pages are `visual_prompt_prefix` with the image, through transformers' processor (Qwen: pixel_values padded
  per image); queries are query_prefix ("") + text + 10 x query_augmentation_token.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

QWEN_PREFIX = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
SMOL_PREFIX = "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"
SPECS = {  # family -> (transformers model class, processor class, dim, head, visual prompt, augmentation token)
    "qwen2_5_vl": ("Qwen2_5_VLModel", "Qwen2_5_VLProcessor", 128, "custom_text_proj", QWEN_PREFIX, "<|endoftext|>"),
    "qwen3_vl": ("Qwen3VLModel", "Qwen3VLProcessor", 320, "custom_text_proj", QWEN_PREFIX, "<|endoftext|>"),
    "smolvlm": ("Idefics3Model", "Idefics3Processor", 128, "linear", SMOL_PREFIX, "<end_of_utterance>"),
}


def project(proj: nn.Linear, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = proj(hidden)  # (B, L, dim)
    out = out / out.norm(dim=-1, keepdim=True)
    return out * attention_mask.unsqueeze(-1)


def reference_model(family: str, config: Any) -> nn.Module:
    """A colpali-engine model of `family` with random weights (set them with load_state_dict)."""
    import transformers

    model_class, _, dim, _, _, _ = SPECS[family]
    if family == "smolvlm":
        class ColIdefics3(transformers.Idefics3PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.model = transformers.Idefics3Model(config)
                self.dim = dim
                self.linear = nn.Linear(config.text_config.hidden_size, dim)
                self.post_init()

            def forward(self, **kwargs):
                return project(self.linear, self.model(**kwargs)[0], kwargs["attention_mask"])

        return ColIdefics3(config)

    class ColQwen(getattr(transformers, model_class)):
        def __init__(self, config):
            super().__init__(config)
            self.dim = dim
            self.custom_text_proj = nn.Linear(config.text_config.hidden_size, dim)
            self.post_init()

        def forward(self, **kwargs):
            if "pixel_values" in kwargs:
                offsets = kwargs["image_grid_thw"][:, 1] * kwargs["image_grid_thw"][:, 2]  # (B,)
                kwargs["pixel_values"] = torch.cat([seq[:n] for seq, n in zip(kwargs["pixel_values"], offsets)])
            hidden = super().forward(**kwargs, use_cache=False, return_dict=True).last_hidden_state
            return project(self.custom_text_proj, hidden, kwargs["attention_mask"])

    return ColQwen(config)


def reference_processor(family: str, folder: str):
    """transformers' processor of the family from the checkpoint folder, left-padding, without the video processor
    (transformers' video processors need torchvision; pages never use it)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (  # type: ignore[method-assign]
        lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
    _, processor_class, _, _, _, _ = SPECS[family]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    if family == "smolvlm":
        with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
            seq = json.load(f).get("image_seq_len", 64)
        processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                   image_seq_len=seq)
    else:
        processor = getattr(transformers, processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                           video_processor=None)
    processor.tokenizer.padding_side = "left"
    return processor


def process_images(family: str, processor, images) -> dict[str, torch.Tensor]:
    prefix = SPECS[family][4]
    batch = processor(text=[prefix] * len(images), images=[image.convert("RGB") for image in images],
                      padding="longest", return_tensors="pt")
    batch = dict(batch)
    if family != "smolvlm":  # one padded row of patches per image, as ColQwen processors hand them to the model
        offsets = batch["image_grid_thw"][:, 1] * batch["image_grid_thw"][:, 2]
        batch["pixel_values"] = torch.nn.utils.rnn.pad_sequence(
            list(torch.split(batch["pixel_values"], offsets.tolist())), batch_first=True)
    return batch


def process_queries(family: str, processor, queries: list[str]) -> dict[str, torch.Tensor]:
    texts = ["" + query + SPECS[family][5] * 10 for query in queries]
    return dict(processor(text=texts, return_tensors="pt", padding="longest"))


@torch.no_grad()
def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model's (L_i, dim) vectors of each item's real tokens."""
    out = model(**batch)  # (B, L, dim)
    return [row[mask.bool()] for row, mask in zip(out, batch["attention_mask"])]

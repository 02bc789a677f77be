"""--gradient_checkpointing recomputes only where gradients flow: with LoRA on the language model, the frozen vision
tower's forward runs once (counted with torch's FlopCounterMode), as without checkpointing; the language model's
layers run twice. With --lora_vision the vision tower is checkpointed too."""
from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from colintern import ColIntern
from helpers import noisy_page

pytestmark = pytest.mark.usefixtures("one_thread")
PAGE = noisy_page(224, 300, (255, 0, 0), 1)


def step_flops(folder: str, checkpoint: str | None, lora_vision: bool = False) -> dict[str, int]:
    """FLOPs of one page's forward + backward by module (vision tower, language model, all) in LoRA mode."""
    model = ColIntern.from_pretrained(folder, max_tiles=2, dim=32)
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, include_vision=lora_vision)
    for name, param in model.backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    if checkpoint is not None:
        model.checkpoint_activations(include_vision=checkpoint == "all")
    model.train(True)
    batch = model.processor.process_images([PAGE])
    with FlopCounterMode(display=False, depth=None) as counter:
        vectors, _ = model(batch)  # (1, L, dim)
        vectors.pow(2).sum().backward()
    counts = counter.get_flop_counts()
    total = {name: sum(by_op.values()) for name, by_op in counts.items()}
    return {"vision": total["ColIntern.backbone.vision_tower"], "language": total["ColIntern.backbone.language_model"],
            "all": total["Global"]}


def test_checkpointing_leaves_the_frozen_vision_tower_alone(tiny_model_dir):
    plain = step_flops(tiny_model_dir, None)
    lm_only = step_flops(tiny_model_dir, "language")
    everything = step_flops(tiny_model_dir, "all")
    assert lm_only["vision"] == plain["vision"] > 0  # no backward in the tower, no recompute either
    assert lm_only["language"] > plain["language"]  # its layers are recomputed in the backward
    assert everything["vision"] >= 2 * plain["vision"]  # what checkpointing the whole backbone wasted: a second pass
    assert everything["all"] > lm_only["all"] > plain["all"]


def test_with_lora_vision_the_vision_tower_is_checkpointed_too(tiny_model_dir):
    plain = step_flops(tiny_model_dir, None, lora_vision=True)
    both = step_flops(tiny_model_dir, "all", lora_vision=True)
    assert both["vision"] > plain["vision"]  # trained, so its activations are recomputed for its backward

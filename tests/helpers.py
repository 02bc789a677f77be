"""Small builders shared by the tests (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from PIL import Image


def noisy_page(width: int, height: int, colour: tuple[int, int, int], seed: int = 0) -> Image.Image:
    """A page of one colour under seeded noise, so different pages, tiles and patches differ."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(height, width, 3, generator=g) * 60).to(torch.uint8)
    base = torch.tensor(colour, dtype=torch.uint8).expand(height, width, 3)
    return Image.fromarray((base.int() * 3 // 4 + noise.int()).clamp(0, 255).to(torch.uint8).numpy())

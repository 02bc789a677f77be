"""Small builders shared by the tests (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# The command-line scripts at the repository root are shims over these modules (the code the tests exercise).
SCRIPT_MODULES = {name: f"colintern.scripts.{name}" for name in
                  ("train", "eval", "mine", "search", "plot_training_loss", "plot_vidore_metrics")}
SCRIPT_MODULES["mteb_model"] = "colintern.eval.mteb_model"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """A script as a module: "train", "eval", ... are the package modules behind the root scripts; "bench/scoring"
    and the like are loaded from their file (with the repository and bench/ importable, as `python bench/x.py`)."""
    if name in SCRIPT_MODULES:
        return importlib.import_module(SCRIPT_MODULES[name])
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(module_name or f"{name.replace('/', '_')}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noisy_page(width: int, height: int, colour: tuple[int, int, int], seed: int = 0) -> Image.Image:
    """A page of one colour under seeded noise, so different pages, tiles and patches differ."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(height, width, 3, generator=g) * 60).to(torch.uint8)
    base = torch.tensor(colour, dtype=torch.uint8).expand(height, width, 3)
    return Image.fromarray((base.int() * 3 // 4 + noise.int()).clamp(0, 255).to(torch.uint8).numpy())


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of same-shaped tensors (the shapes must match)."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def perturb_lora(model, std: float) -> None:
    """peft starts every LoRA B at zero (the adapters change nothing); draw them from N(0, std^2) with torch's
    global generator so that the adapters act on the output."""
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


_SCRIPTS: dict[str, ModuleType] = {}
SEARCH_COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (220, 200, 40), (40, 190, 200), (120, 60, 160)]
SEARCH_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def search_page(i: int) -> Image.Image:
    """Page i of the search tests' documents: a colour, a white box that moves with i, a word."""
    image = Image.new("RGB", (170, 220), SEARCH_COLOURS[i % 6])
    draw = ImageDraw.Draw(image)
    draw.rectangle((20 + 10 * i, 30, 90 + 10 * i, 100), fill=(255, 255, 255))
    draw.text((25, 150), SEARCH_WORDS[i % 6], fill=(0, 0, 0))
    return image


def search_run(capsys, *argv) -> tuple[int, str, str]:
    """search.py main(argv) as the command line runs it: (exit status, stdout, stderr)."""
    from colintern.cli import run_cli

    if "search" not in _SCRIPTS:
        _SCRIPTS["search"] = load_script("search")
    search = _SCRIPTS["search"]
    code = run_cli(search.main, [str(a) for a in argv], out_flag=search.OUT_FLAG)
    captured = capsys.readouterr()
    return code, captured.out, captured.err

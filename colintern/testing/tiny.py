"""Build a tiny InternVL3.5-architecture model (or a tiny Qwen3-VL) for offline tests and the CPU demo
(docs/CONTRACT.md §9).

    python -m colintern.testing.tiny OUT [--layout native|remote] [--seed 0]
    python -m colintern.testing.tiny OUT --backbone qwen3_vl      # a tiny Qwen3-VL instead

The same architecture as the real models at toy sizes, with random (seeded) weights and a byte-level BPE
tokenizer trained locally (`colintern/testing/toy_tokenizer.py`). For InternVL, --layout native writes a transformers
`InternVLForConditionalGeneration` folder (model_type "internvl"); --layout remote writes the same weights the way
original OpenGVLab checkpoints store them (model_type "internvl_chat", fused vision qkv), which ColIntern converts
in-process. Every layout loads through `--model_id OUT`. Each family's builder is its `build_tiny`
(`colintern/backbones/internvl.py`, `colintern/backbones/qwen3vl.py`).
"""
from __future__ import annotations

import sys

from colintern.cli import parse_config, run_cli, setup_logging
from colintern.settings import TinyConfig
from colintern.errors import UserError
from colintern.backbones.registry import get_family


def main(argv: list[str] | None = None) -> int:
    config = parse_config(TinyConfig, argv, __doc__, prog="python -m colintern.testing.tiny")
    setup_logging(verbose=config.verbose)
    family = get_family(config.backbone)
    options = {"layout": config.layout} if config.layout else {}
    unknown = sorted(set(options) - set(family.tiny_options))
    if unknown:
        raise UserError(f"--{unknown[0]} does not apply to --backbone {family.name}")
    family.build_tiny(config.out, seed=config.seed, **options)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

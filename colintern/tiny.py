"""Build a tiny InternVL3.5-architecture model (or a tiny Qwen3-VL) for offline tests and the CPU demo
(docs/CONTRACT.md §9).

    python -m colintern.tiny OUT [--layout native|remote] [--seed 0]
    python -m colintern.tiny OUT --backbone qwen3_vl      # a tiny Qwen3-VL instead

The same architecture as the real models at toy sizes, with random (seeded) weights and a byte-level BPE
tokenizer trained locally (`colintern/toy_tokenizer.py`). For InternVL, --layout native writes a transformers
`InternVLForConditionalGeneration` folder (model_type "internvl"); --layout remote writes the same weights the way
original OpenGVLab checkpoints store them (model_type "internvl_chat", fused vision qkv), which ColIntern converts
in-process. Every layout loads through `--model_id OUT`. Each family's builder is its `build_tiny`
(`colintern/internvl.py`, `colintern/qwen3vl.py`).
"""
from __future__ import annotations

import argparse
import sys

from colintern.cli import run_cli, setup_logging
from colintern.families import FAMILIES, get_family


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colintern.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--backbone", choices=sorted(FAMILIES), default="internvl",
                        help="backbone family to build (default: internvl)")
    parser.add_argument("--layout", choices=["native", "remote"], default=None,
                        help="internvl only: transformers-native InternVL or original internvl_chat checkpoint "
                             "layout (default: native)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (default: progress only)")
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    family = get_family(args.backbone)
    options = {"layout": args.layout} if args.layout else {}
    unknown = sorted(set(options) - set(family.tiny_options))
    if unknown:
        parser.error(f"--{unknown[0]} does not apply to --backbone {family.name}")
    family.build_tiny(args.out, seed=args.seed, **options)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

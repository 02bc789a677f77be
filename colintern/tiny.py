"""Build a tiny InternVL3.5-architecture checkpoint for offline tests and the CPU demo (SPEC §9).

    python -m colintern.tiny OUT [--layout native|remote] [--seed 0]
    python -m colintern.tiny OUT --backbone qwen3_vl      # a tiny Qwen3-VL instead (colintern/qwen3vl.py)

Same architecture as InternVL3.5 (InternViT vision tower with qkv bias and layer scale, pixel-shuffle MLP
projector, Qwen3 language model), with tiny sizes: 112-px tiles of 14-px patches (16 image tokens per tile),
and a byte-level BPE tokenizer trained locally with `tokenizers`. The weights are random (seeded).

--layout native writes a transformers `InternVLForConditionalGeneration` folder (model_type "internvl");
--layout remote writes the same weights the way original OpenGVLab checkpoints store them
(model_type "internvl_chat", fused vision qkv, `vision_model.`/`mlp1.`/`language_model.model.` names), which
ColIntern converts in-process. Both load through `--model_id OUT`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import torch

from colintern.errors import UserError, run_cli

log = logging.getLogger("colintern")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]

# Text the tokenizer is trained on: the words of the synthetic corpus and of ordinary queries.
_TOKENIZER_TEXT = """
Query: which page shows the red circle on a blue background? Describe the document page.
What is the amount of revenue in the table? Where is the figure about the results of the experiment?
red orange yellow green blue purple pink brown black white gray grey cyan magenta teal navy
circle square triangle star cross stripes diamond ring hexagon heart arrow dot grid
alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega north south east west
zero one two three four five six seven eight nine ten hundred thousand
page document report table chart figure image photo slide invoice form letter paper section title
the a an of on in with and or to is are was which what where who how when why does do has have show shows
background foreground left right top bottom middle center big large small word number text with the word
find me look for a page that contains containing showing shown colour color shape
"""


def build_tokenizer(out_dir: str, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer (deterministic for a fixed text) and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for line in _TOKENIZER_TEXT.strip().splitlines()]
    tok.train_from_iterator(lines * 4 + [line.upper() for line in lines] + [line.title() for line in lines],
                            trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=8192)
    fast.padding_side = "right"
    fast.save_pretrained(out_dir)
    return fast


def tiny_internvl_config(vocab_size: int, image_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    vision = InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, attention_bias=True,
        use_qk_norm=False, image_size=112, patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6,
        use_mean_pooling=True, use_absolute_position_embeddings=True, hidden_act="gelu",
    )
    text = Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=True, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                          image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=True)


def internvl35_1b_config(image_token_id: int, attn_implementation: str = "sdpa"):
    """The real InternVL3.5-1B shapes (InternViT-300M 1024 x 24 layers with qkv bias + Qwen3-0.6B 1024 x 28 layers,
    vocab 151936), for smoke tests and benchmarks with random weights."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, attention_bias=True, image_size=448, patch_size=14,
                                  use_mean_pooling=True, norm_type="layer_norm", layer_norm_eps=1e-6)
    text = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                            image_seq_length=256, downsample_ratio=0.5)
    config._attn_implementation = attn_implementation
    return config


# Inverse of colintern.backbone's renames: native name -> original InternVL name.
_TO_REMOTE = [
    (r"^vision_tower\.", "vision_model."),
    (r"\.layer\.", ".layers."),
    (r"embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]


def to_remote_state_dict(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `InternVLForConditionalGeneration` weights the way an original InternVL checkpoint stores them."""
    flat = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in native.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if key.startswith("vision_tower."):
            new = key
            for pattern, repl in _TO_REMOTE:
                new = re.sub(pattern, repl, new)
            if ".attn.q_proj." in new:  # fuse q, k, v into one qkv projection: 3 x (H, H) -> (3H, H)
                parts = [flat[key.replace(".q_proj.", f".{p}.")] for p in ("q_proj", "k_proj", "v_proj")]
                out[new.replace(".attn.q_proj.", ".attn.qkv.")] = torch.cat(parts, dim=0).contiguous()
            elif ".attn.k_proj." not in new and ".attn.v_proj." not in new:
                out[new] = value.contiguous()
        elif key.startswith("multi_modal_projector."):
            names = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
            part, rest = key[len("multi_modal_projector."):].split(".", 1)
            out[f"mlp1.{names[part]}.{rest}"] = value.contiguous()
        elif key.startswith("language_model."):
            out["language_model.model." + key[len("language_model."):]] = value.contiguous()
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value.clone().contiguous()
    return out


def remote_config_json(config) -> dict:
    """An original-style `internvl_chat` config.json for the same architecture."""
    vision = config.vision_config
    text = config.text_config.to_dict()
    text["architectures"] = ["Qwen3ForCausalLM"]
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": config.downsample_ratio, "dynamic_image_size": True, "force_image_size": vision.image_size[0],
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "use_thumbnail": True,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size, "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm, "norm_type": vision.norm_type, "layer_norm_eps": vision.layer_norm_eps,
            "image_size": vision.image_size[0], "patch_size": vision.patch_size[0], "num_channels": 3,
            "hidden_act": vision.hidden_act, "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
            "initializer_range": 0.02, "initializer_factor": 1.0, "use_flash_attn": False,
        },
        "llm_config": text,
    }


def build_tiny_internvl(out_dir: str, layout: str = "native", seed: int = 0) -> str:
    """Write the tiny model to out_dir in the given layout; returns out_dir."""
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = tiny_internvl_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 112, "width": 112},
                    "crop_to_patches": True, "min_patches": 1, "max_patches": 12, "do_resize": True,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
    if layout == "native":
        model.save_pretrained(out_dir)
    elif layout == "remote":
        state = to_remote_state_dict(model.state_dict())
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(remote_config_json(config), f, indent=2)
    else:
        raise UserError(f"--layout must be 'native' or 'remote', got {layout!r}")
    log.info("wrote tiny InternVL3.5-architecture model (%s layout, %.2fM parameters) to %s", layout,
             sum(p.numel() for p in model.parameters()) / 1e6, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colintern.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--layout", choices=["native", "remote"], default="native",
                        help="checkpoint layout: transformers-native InternVL or original internvl_chat (default: native)")
    parser.add_argument("--backbone", choices=["internvl", "qwen3_vl"], default="internvl",
                        help="architecture to build (default: internvl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.backbone == "qwen3_vl":
        from colintern.qwen3vl import build_tiny_qwen3vl

        build_tiny_qwen3vl(args.out, seed=args.seed)
    else:
        build_tiny_internvl(args.out, layout=args.layout, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Does the backbone still understand questions? Greedy answers with the retriever's own tokenization.

    python -m colintern.backbones.sanity --model_id OpenGVLab/InternVL3_5-1B-HF --ckpt outputs/train/colintern_heads_epoch1.pt
    python -m colintern.backbones.sanity --model_id M --question "What is the capital of France?" --max_new_tokens 20

Seed 002 asks for this check: after LoRA training (or with an instruction, or bidirectional attention) a user wants
to see that the language model still reads the queries the way the retriever formats them. The question is
formatted exactly as the retriever formats a query (its prefix or NV-Embed instruction, from the checkpoint's
config, without the augmentation tokens), tokenised by the same tokenizer, the checkpoint's LoRA adapters are
applied to the generation model, and the answer is decoded greedily, token by token, with causal attention (a
bidirectional retriever still generates causally; the output says so). The decoding loop is written out here and
tested token for token against transformers' own `generate` on the tiny models.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from colintern.cli import parse_config, run_cli, setup_logging
from colintern.settings import SanityConfig
from colintern.errors import UserError

log = logging.getLogger("colintern.backbones.sanity")

QUESTIONS = ["What is the capital of France?", "Which page shows the revenue table of the annual report?",
             "How many sides does a triangle have?"]


def generation_model(model_id: str, ckpt: str | None, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(a ...ForConditionalGeneration with the checkpoint's LoRA applied, the ColIntern sharing its backbone)."""
    from colintern.backbones.base import read_model_config
    from colintern.retriever.checkpoint import check_compatible, load_checkpoint
    from colintern.retriever.config import ColInternConfig
    from colintern.backbones.registry import BY_MODEL_TYPE
    from colintern.retriever.model import ColIntern, config_for_backbone

    raw = read_model_config(model_id)
    family = BY_MODEL_TYPE.get(str(raw.get("model_type")))
    if family is None or raw.get("model_type") == "internvl_chat":
        raise UserError(f"{model_id}: model_type {raw.get('model_type')!r}: the sanity check generates with a "
                        "transformers-native checkpoint (InternVL ...-HF or Qwen3-VL); original internvl_chat "
                        "folders carry their LM head under remote code")
    generator, loaded = family.load_generator(model_id, dtype)
    generator.to(device).eval()
    payload = load_checkpoint(ckpt) if ckpt else None
    if payload is not None:
        check_compatible(payload, loaded.signature, str(ckpt))
        model = ColIntern(loaded, ColInternConfig.from_dict(payload["config"]))
        model.load_parts(payload)  # LoRA adapters go into the generator's own layers
    else:
        model = ColIntern(loaded, config_for_backbone(loaded, model_id))
    from colintern.retriever.pooling import set_text_attention

    set_text_attention(family.language_model(loaded.model), "causal")  # generation is causal, always
    return generator, model.to(device)


@torch.inference_mode()
def greedy(generator: Any, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
           **inputs: torch.Tensor) -> list[int]:
    """Greedy decoding written out: the whole sequence through the model each step, the most likely next token,
    until EOS or max_new_tokens. (B = 1; no cache, so nothing hides in generation state.) `inputs`: what else the
    model reads at every step (pixel_values of the page the prompt shows)."""
    ids = input_ids
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = generator(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[:, -1]  # (1, vocab)
        token = int(logits.argmax(dim=-1))
        new.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def question_ids(model: Any, question: str) -> torch.Tensor:
    """(1, L) token ids of a question formatted as the retriever formats a query, without augmentation tokens."""
    text = model.processor.query_prefix() + question
    return model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def parse_args(argv: list[str] | None) -> SanityConfig:
    return parse_config(SanityConfig, argv, __doc__, prog="python -m colintern.backbones.sanity")


def main(argv: list[str] | None = None) -> int:
    from colintern.device import resolve_device
    from colintern.retriever.model import resolve_dtype

    config = parse_args(argv)
    setup_logging(config.verbose)
    device = resolve_device(config.device)
    generator, model = generation_model(config.model_id, config.ckpt, device, resolve_dtype(None, device))
    if model.config.attention == "bidirectional":
        print("note: the retriever attends bidirectionally; answers are generated with causal attention")
    for question in config.question or QUESTIONS:
        ids = question_ids(model, question).to(device)
        answer = greedy(generator, ids, config.max_new_tokens, model.tokenizer.eos_token_id)
        print(f"Q: {model.tokenizer.decode(ids[0])}\nA: {model.tokenizer.decode(answer, skip_special_tokens=True)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

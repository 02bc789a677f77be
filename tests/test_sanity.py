"""python -m colintern.backbones.sanity: greedy answers with the retriever's formatting, the checkpoint's LoRA in the
generator, and the decoding loop equal, token for token, to transformers' own generate (both backbones)."""
from __future__ import annotations

import pytest
import torch

from colintern.backbones import sanity
from colintern.retriever.checkpoint import save_checkpoint
from helpers import perturb_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_equals_generate_and_the_lora_reaches_the_generator(tiny_backbone, tmp_path, capsys):
    name, folder = tiny_backbone
    generator, model = sanity.generation_model(folder, None, "cpu", torch.float32)
    ids = sanity.question_ids(model, "What is the capital of France?")
    assert model.tokenizer.decode(ids[0]) == "Query: What is the capital of France?"
    ours = sanity.greedy(generator, ids, 12, model.tokenizer.eos_token_id)
    theirs = generator.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                eos_token_id=model.tokenizer.eos_token_id,
                                pad_token_id=model.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert ours == theirs and len(ours) >= 1

    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    perturb_lora(model, 0.5)
    ckpt = tmp_path / "lora.pt"
    save_checkpoint(str(ckpt), **model.checkpoint_parts())
    plain, _ = sanity.generation_model(folder, None, "cpu", torch.float32)
    adapted, with_lora = sanity.generation_model(folder, str(ckpt), "cpu", torch.float32)
    assert with_lora.lora_config is not None and with_lora.backbone is adapted.model
    with torch.inference_mode():
        a = plain(input_ids=ids).logits[0, -1]
        b = adapted(input_ids=ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-3  # the adapters act on the generation model's layers
    assert sanity.main(["--model_id", folder, "--ckpt", str(ckpt), "--question", "How many sides?",
                        "--max_new_tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: Query: How many sides?\nA: ")

"""A byte-level BPE tokenizer trained locally (deterministic), for the tiny test models of every backbone family.

It knows the special tokens of both families (InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`; Qwen3-VL's
`<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`) and the words of the synthetic corpus.
"""
from __future__ import annotations

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


def build_tokenizer(out_dir: str, vocab_size: int = 1024, extra_special_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer (deterministic for a fixed text) and save it as a fast tokenizer.
    `extra_special_tokens`: a family's own markup tokens, after the shared ones (the other families' tokenizers, and
    so their seeded tiny models, stay as they were)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for line in _TOKENIZER_TEXT.strip().splitlines()]
    tok.train_from_iterator(lines * 4 + [line.upper() for line in lines] + [line.title() for line in lines],
                            trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=8192)
    fast.padding_side = "right"
    fast.save_pretrained(out_dir)
    return fast


def write_original_layout(out_dir: str) -> None:
    """Rewrite the tokenizer saved in out_dir the way the original InternVL (and Qwen2/3) repositories ship theirs:
    vocab.json + merges.txt + added_tokens.json and a tokenizer_config.json naming Qwen2Tokenizer, no tokenizer.json,
    so that the tiny remote-layout model loads through the same tokenizer path as the real checkpoints."""
    import json
    import os

    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(saved["model"]["vocab"], f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines((m if isinstance(m, str) else " ".join(m)) + "\n" for m in saved["model"]["merges"])
    added = {t["content"]: t["id"] for t in saved["added_tokens"]}
    with open(os.path.join(out_dir, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f, indent=2)
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 8192, "padding_side": "right", "added_tokens_decoder": {
                  str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                           "single_word": False} for c, i in added.items()}}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.remove(path)

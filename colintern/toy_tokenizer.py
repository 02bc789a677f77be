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

"""Questions a page answers, written by a vision-language model that looks at the page (make_dataset --generator).

For scans without a text layer, and for pages whose sentences make poor queries (slides, forms, figures), a
generator VLM given the page image writes the questions instead: any transformers-native checkpoint of a family
ColIntern loads, with its LM head (InternVL3.5 ...-HF, Qwen3-VL ...-Instruct), through the family's own page
processing. The prompt is PROMPT, in the chat format both families use; decoding is greedy, batched (left padding),
and each page's raw answer is appended to OUT/generated.jsonl as it comes, keyed by the page, the model and the
prompt: an interrupted run resumes without generating those pages again, and dataset.json records the model and the
prompt. The answer is split into lines, numbering and bullets removed; the lines that pass make_dataset's query
filter (--min_words, --max_words, mostly letters) are the page's queries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from colintern.errors import UserError
from colintern.files import count_complete_lines, display

log = logging.getLogger("colintern.data.make_dataset")
CACHE = "generated.jsonl"
PROMPT = ("<|im_start|>user\n<image>\nWrite {n} different questions that a person searching a collection of "
          "documents could ask, each answered by this page. One question per line, without numbering.<|im_end|>\n"
          "<|im_start|>assistant\n")
NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d{1,2}[.):]|Q\d*[.:])\s*")


def prompt_for(n: int) -> str:
    return PROMPT.replace("{n}", str(n))


def split_questions(text: str) -> list[str]:
    """The answer's lines as questions: numbering and bullets removed, blank lines and repeats dropped."""
    lines = [NUMBERING.sub("", line).strip() for line in text.splitlines()]
    return list(dict.fromkeys(line for line in lines if line))


class QuestionWriter:
    """A generator VLM and its page processor with the question prompt; answers pages in batches."""

    def __init__(self, model_id: str, device: str, questions: int, max_new_tokens: int):
        from colintern.backbones.sanity import generation_model
        from colintern.retriever.model import resolve_dtype

        self.model_id, self.device, self.max_new_tokens = model_id, device, max_new_tokens
        self.prompt = prompt_for(questions)
        self.generator, retriever = generation_model(model_id, None, device, resolve_dtype(None, device))
        import copy

        self.processor = copy.copy(retriever.processor)  # the family's page rules, with the question prompt
        self.processor.config = replace(retriever.config, page_prompt=self.prompt, keep_page_tokens="all")
        self.tokenizer = retriever.tokenizer
        self.key_prefix = hashlib.sha1(f"{model_id}\n{self.prompt}\n{max_new_tokens}".encode()).hexdigest()[:12]

    def model_inputs(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The pages with the question prompt, left-padded (generation appends on the right)."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            batch = self.processor.process_images(images)
        finally:
            self.tokenizer.padding_side = side
        batch.pop("keep_mask")
        dtype = next(self.generator.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    @torch.inference_mode()
    def answer(self, images: Sequence[Any]) -> list[str]:
        """Greedy answers to the question prompt, one per page image."""
        inputs = self.model_inputs(images)
        out = self.generator.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]


def read_cache(path: Path) -> dict[str, str]:
    """key -> raw answer of every complete line of the cache (a line torn by a crash is ignored and overwritten)."""
    if not path.is_file():
        return {}
    _, size = count_complete_lines(path)
    with open(path, "r+b") as f:
        f.truncate(size)  # drop a torn last line, so that appends start on a line of their own
    done = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
            done[str(row["key"])] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{display(path)}:{number}: not a line this command wrote (damaged); delete that line, "
                            "or the file to generate every page's questions again") from None
    return done


def generate_questions(pages: list[Any], images: list[Path], root: Path, model_id: str, device: str, questions: int,
                       max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Fill page.queries of each page (rendered as the PNG at the same position in `images`) from the generator's
    answer, with the answers cached in root / CACHE; returns what dataset.json records about the generator."""
    from PIL import Image
    from tqdm.auto import tqdm

    writer = QuestionWriter(model_id, device, questions, max_new_tokens)
    cache = root / CACHE
    done = read_cache(cache)
    keys = {id(page): f"{writer.key_prefix}/{page.document}/{page.number}" for page in pages}
    image_of = {id(page): image for page, image in zip(pages, images)}
    todo = [page for page in pages if keys[id(page)] not in done]
    if len(todo) < len(pages):
        log.info("%d of %d pages already have their questions in %s (an earlier run): generating the other %d",
                 len(pages) - len(todo), len(pages), display(cache), len(todo))
    with open(cache, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="write questions", unit="page") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = writer.answer([Image.open(image_of[id(page)]).convert("RGB") for page in batch])
            for page, text in zip(batch, answers):
                done[keys[id(page)]] = text
                f.write(json.dumps({"key": keys[id(page)], "page": f"{page.document}/{page.number}",
                                    "text": text}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    for page in pages:
        page.queries = split_questions(done[keys[id(page)]])
    return {"model": model_id, "prompt": writer.prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy",
            "batch_size": batch_size, "cache": CACHE}

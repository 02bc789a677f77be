"""The sentence-transformers 6 layout of an exported model (search.py export_model), so that
`MultiVectorEncoder(FOLDER)` (multi-vector models) or `SentenceTransformer(FOLDER)` (single-vector ones) loads it
without ColIntern.

The folder's root is transformers' own: the merged weights under a class transformers knows, the tokenizer, and
transformers' processor for the family (processor_config.json, preprocessor_config.json) with a chat template that
renders a query or a page exactly as ColIntern's processor does: the query prefix, the text and the augmentation
tokens for `task == "query"`; the page prompt around the image placeholder for an image. sentence-transformers turns
every input into a chat message, renders it with that template and runs the modules listed in modules.json:

    multi-vector:  Transformer -> 1_Dense (the head) -> 2_MultiVectorMask (which page tokens count) -> 3_Normalize
    single-vector: Transformer -> 1_Pooling (last token) -> 2_Dense (the head) -> 3_Normalize

What cannot be expressed (docs/DESIGN.md, "The sentence-transformers export"):
- ColIntern's default page-token rule, keep_page_tokens "page" (the tokens from the image on), is a position rule;
  MultiVectorMask can only drop token ids. The export drops the ids that occur only in the prompt before the image,
  so a prompt token whose id also occurs after the image is scored as well (InternVL's default prompt: the "\\n"
  before the image, one page-independent vector per page). `page_rule_difference` names those tokens.
- Single-vector models with mean or latent pooling or bidirectional attention: sentence-transformers' Pooling cannot
  leave out the query prefix inside a chat-rendered input, has no latent pooler, and loads the LM causal. Those
  exports keep only ColIntern's own files (`sentence_transformers_gap` says why).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("colintern")

MESSAGE_MODALITY = {"method": "forward", "method_output_name": "last_hidden_state"}


def sentence_transformers_gap(config: Any) -> str | None:
    """Why a model with this ColInternConfig has no sentence-transformers layout, or None when it has one."""
    if config.embedding == "multi":
        return None
    if config.attention != "causal":
        return "its language model attends bidirectionally, which a transformers folder cannot declare"
    if config.pooling != "last":
        return (f"its {config.pooling} pooling leaves the query prefix out of the pooled tokens, which "
                "sentence-transformers' Pooling cannot do for chat-rendered inputs" if config.pooling == "mean"
                else "sentence-transformers has no latent-attention pooler")
    return None


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template(config: Any, image_placeholder: str) -> str:
    """The chat template that renders one user message as ColIntern's processor formats its input: a text part as
    a query (prefix, text, augmentation tokens, suffix: colintern.backbones.processor.PageProcessor.format_query),
    an image part as the page prompt with `image_placeholder` where the prompt says "<image>"."""
    if config.instruction:
        prefix = f"Instruct: {config.instruction}\nQuery: "
    else:
        prefix = config.query_prefix
    suffix = config.augmentation_token * config.n_augmentation + config.query_suffix
    page = config.page_prompt.replace("<image>", image_placeholder)
    return (
        "{#- ColIntern: a query is prefix + text + augmentation; a page is the page prompt around the image -#}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}"
        "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}\n"
        "{%- for part in parts -%}\n"
        "{%- if part['type'] == 'image' -%}" + "{{ " + _jinja_string(page) + " }}"
        "{%- elif part['type'] == 'text' -%}"
        "{{ " + _jinja_string(prefix) + " }}{{ part['text'] }}{{ " + _jinja_string(suffix) + " }}"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- endfor -%}\n"
    )


def page_token_mask(processor: Any) -> tuple[dict[str, Any], list[str]]:
    """(2_MultiVectorMask/config.json, the prompt tokens sentence-transformers scores that ColIntern does not), for a
    family's page processor (its config and tokenizer).

    "all": every real token; "image": only the image token (keep_only_token_ids); "page": every real token except
    the ids that occur before the first image token and never after it. Those are read off pages the processor
    prepares (the costliest page and a small one: a family's image markup can differ with the tile count)."""
    from PIL import Image

    config, tokenizer = processor.config, processor.tokenizer
    mask: dict[str, Any] = {"skiplist_words": [], "skiplist_tasks": ["document"], "keep_only_token_ids": None}
    if config.keep_page_tokens == "image":
        mask["keep_only_token_ids"] = [int(tokenizer.convert_tokens_to_ids(config.image_token))]
        return mask, []
    if config.keep_page_tokens == "all":
        return mask, []
    inputs = processor.process_images([processor.worst_case_page(), Image.new("RGB", (64, 48), (255, 255, 255))])
    real, keep = inputs["attention_mask"].bool(), inputs["keep_mask"].bool()  # (2, L)
    later = set(inputs["input_ids"][keep].tolist())
    before = list(dict.fromkeys(inputs["input_ids"][real & ~keep].tolist()))
    mask["skiplist_words"] = [tokenizer.convert_ids_to_tokens(i) for i in before if i not in later]
    return mask, [tokenizer.convert_ids_to_tokens(i) for i in before if i in later]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_processor(folder: Path, model: Any) -> None:
    """processor_config.json, preprocessor_config.json, chat_template.jinja, and the named tokens in the tokenizer
    files: what AutoProcessor.from_pretrained(folder) reads."""
    files = model.family.transformers_processor(model.config)
    _write_json(folder / "preprocessor_config.json", files.image_processor)
    _write_json(folder / "processor_config.json", {"processor_class": files.processor_class,
                                                   **files.processor_settings})
    (folder / "chat_template.jinja").write_text(chat_template(model.config, files.image_placeholder),
                                                encoding="utf-8")
    if files.tokenizer_tokens:
        path = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
        extra = dict(tokenizer_config.get("extra_special_tokens") or {})
        extra.update(files.tokenizer_tokens)
        tokenizer_config["extra_special_tokens"] = extra
        _write_json(path, tokenizer_config)


def _transformers_class(module: torch.nn.Module) -> str:
    """The name of the transformers class a backbone is (or subclasses), for config.json's architectures."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(module).__name__


def write_sentence_transformers_files(folder: Path, model: Any) -> list[str]:
    """Add the sentence-transformers layout to an export folder that already holds the merged weights and the
    tokenizer. Returns the page-prompt tokens it scores that ColIntern does not ([] when it scores the same)."""
    from safetensors.torch import save_file

    import sentence_transformers
    import transformers

    config = model.config
    config_json = folder / "config.json"
    values = json.loads(config_json.read_text(encoding="utf-8"))
    values["architectures"] = [_transformers_class(model.backbone)]  # a class transformers knows
    _write_json(config_json, values)
    _write_processor(folder, model)
    head = {"linear.weight": model.head.weight.detach().float().cpu().contiguous(),
            "linear.bias": model.head.bias.detach().float().cpu().contiguous()}
    dense = {"in_features": config.hidden_size, "out_features": config.dim, "bias": True,
             "activation_function": "torch.nn.modules.linear.Identity"}
    multi = config.embedding == "multi"
    if multi:
        tokens, vector = "token_embeddings", "token_embeddings"
        mask, extra_tokens = page_token_mask(model.processor)
        modules = [("1_Dense", "sentence_transformers.base.modules.Dense"),
                   ("2_MultiVectorMask", "sentence_transformers.multi_vector_encoder.modules.MultiVectorMask"),
                   ("3_Normalize", "sentence_transformers.base.modules.Normalize")]
        _write_json(folder / "2_MultiVectorMask" / "config.json", mask)
    else:
        tokens, vector, extra_tokens = "token_embeddings", "sentence_embedding", []
        modules = [("1_Pooling", "sentence_transformers.sentence_transformer.modules.Pooling"),
                   ("2_Dense", "sentence_transformers.base.modules.Dense"),
                   ("3_Normalize", "sentence_transformers.base.modules.Normalize")]
        _write_json(folder / "1_Pooling" / "config.json", {"embedding_dimension": config.hidden_size,
                                                           "pooling_mode": "lasttoken", "include_prompt": True})
    dense_dir = folder / modules[0 if multi else 1][0]
    _write_json(dense_dir / "config.json", {**dense, "module_input_name": vector, "module_output_name": vector})
    save_file(head, str(dense_dir / "model.safetensors"))
    _write_json(folder / modules[-1][0] / "config.json", {"module_input_name": vector, "module_output_name": vector})
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"},
        *({"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules, 1))])
    _write_json(folder / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": MESSAGE_MODALITY, "image": MESSAGE_MODALITY, "message": {**MESSAGE_MODALITY, "format": "structured"}},
        "module_output_name": tokens, "unpad_inputs": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "model_type": "MultiVectorEncoder" if multi else "SentenceTransformer",
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__, "pytorch": torch.__version__.split("+")[0]},
        "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "maxsim" if multi else "cosine"})
    if extra_tokens:
        log.info("sentence-transformers layout: the page prompt's %s before the image also occurs after it, so "
                 "sentence-transformers scores it too (ColIntern does not: keep_page_tokens 'page')", extra_tokens)
    return extra_tokens

"""The model card of an exported model: README.md with Hugging Face Hub metadata (search.py export_model).

Everything in it comes from the checkpoint (its config, LoRA settings and training record: phase, data, steps) and
from the eval.py summaries given with --eval_summary (the table eval.py prints); nothing is typed in by hand, so the
card cannot claim what the checkpoint does not hold. Training data named by a Hub id (vidore/colpali_train_set)
is listed in the metadata; local files are said to be local, never listed as a dataset.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information

from colintern.errors import UserError
from colintern.retriever.checkpoint import is_hub_id



def split_datasets(names: list[str]) -> tuple[list[str], list[str]]:
    """(Hub dataset ids, local files) among the datasets a checkpoint trained on."""
    hub = [n for n in names if is_hub_id(n)]
    return hub, [n for n in names if n not in hub]


def read_summary(path: str) -> dict[str, Any]:
    """An eval.py summary.json (a file, or a run folder holding one), with one-line errors."""
    file = Path(path) / "summary.json" if Path(path).is_dir() else Path(path)
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--eval_summary {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--eval_summary {path}: not a readable eval.py summary.json ({err})") from None
    if not isinstance(summary, dict) or not {"tasks", "main_metric", "average"} <= summary.keys():
        raise UserError(f"--eval_summary {path}: not an eval.py summary.json (no tasks, main_metric, average)")
    return summary


def training_rows(payload: dict[str, Any], base_model: str) -> list[tuple[str, str]]:
    """(what, value) rows of the card's training table, from the checkpoint."""
    config, training = payload["config"], payload.get("training") or {}
    phase = training.get("phase") or {}
    phase_args = phase.get("args") or {}
    single = config.get("embedding") == "single"
    rows = [("base model", base_model), ("backbone family", str(config.get("backbone"))),
            ("embedding", f"single vector ({config.get('pooling')} pooling, {config.get('attention')} attention)"
             if single else "multi-vector (one per token), scored by MaxSim"), ("dimension", str(config.get("dim")))]
    lora = (payload.get("lora") or {}).get("config")
    if lora:
        rows.append(("LoRA", f"r {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')} "
                     f"on {', '.join(lora.get('target_modules') or [])} of the "
                     f"{'language model and vision tower' if lora.get('include_vision') else 'language model'}; "
                     "merged into the weights of this folder"))
    else:
        rows.append(("LoRA", "none: the head alone was trained"))
    if phase:
        negatives = "in-batch negatives" if phase.get("kind") == "hub" else "mined hard negatives + in-batch"
        rows += [("last phase", f"phase {phase.get('index')}, {negatives}"),
                 ("optimizer steps", f"{training.get('step')} in all, {phase.get('steps')} in the last phase"),
                 ("batch", f"{phase.get('batch_size')} pairs x {phase_args.get('grad_accum', 1)} accumulation x "
                           f"{phase.get('world_size', 1)} processes"),
                 ("loss", f"{phase_args.get('loss')}, temperature {phase_args.get('tau')}, lr {phase_args.get('lr')}, "
                          f"{phase_args.get('optimizer')}")]
        hub, local = split_datasets(training.get("datasets") or [])
        rows.append(("training data", ", ".join([f"[{d}](https://huggingface.co/datasets/{d})" for d in hub]
                                                + (["local data, not published"] if local else [])) or "not recorded"))
    rows += [("query format", f"prefix {config.get('query_prefix')!r}, {config.get('n_augmentation')} x "
                              f"{config.get('augmentation_token')!r} augmentation, at most "
                              f"{config.get('max_query_length')} tokens"),
             ("page format", f"{config.get('page_prompt')!r}; tokens kept: {config.get('keep_page_tokens')}")]
    return rows


def sentence_transformers_usage(config: dict[str, Any], repo_id: str, extra_tokens: list[str]) -> list[str]:
    """The model card's lines on loading the folder with sentence-transformers (colintern/retriever/st_layout.py)."""
    from colintern.retriever.config import ColInternConfig
    from colintern.retriever.st_layout import sentence_transformers_gap

    gap = sentence_transformers_gap(ColInternConfig.from_dict(config))
    if gap is not None:
        return [f"sentence-transformers cannot load this model: {gap}.", ""]
    multi = config.get("embedding", "multi") == "multi"
    kind = "MultiVectorEncoder" if multi else "SentenceTransformer"
    lines = ["With sentence-transformers 6 (`pip install \"sentence-transformers[image]\"`: transformers' processors "
             f"for this backbone need torchvision), as a `{kind}`:", "", "```python",
             f"from sentence_transformers import {kind}", "", f"model = {kind}({repo_id!r})",
             "queries = model.encode_query([\"where is the warranty period?\"])",
             "pages = model.encode_document([page_image])           # PIL images of pages",
             "scores = model.similarity(queries, pages)" + ("             # MaxSim" if multi else ""), "```", ""]
    if extra_tokens:
        lines += [f"sentence-transformers also scores the page prompt's {extra_tokens} before the image, one vector "
                  "that is the same on every page (its mask can drop token ids, not positions; ColIntern keeps the "
                  "tokens from the image on), so its scores differ slightly from ColIntern's.", ""]
    return lines


def model_card(payload: dict[str, Any], base_model: str, folder: str, repo_id: str, license: str,
               summaries: list[tuple[str, dict[str, Any]]], st_extra_tokens: list[str] | None = None) -> str:
    """README.md of an exported model folder: Hub metadata, training, scores, usage, upload. `st_extra_tokens`: the
    page-prompt tokens sentence-transformers scores beyond ColIntern's (st_layout.page_token_mask)."""
    from colintern.eval.run import format_table

    config = payload["config"]
    st_extra_tokens = st_extra_tokens or []
    hub, _ = split_datasets((payload.get("training") or {}).get("datasets") or [])
    meta = {"library_name": "colintern", "pipeline_tag": "visual-document-retrieval", "license": license,
            "tags": ["colintern", "visual-document-retrieval", "vidore",
                     "single-vector" if config.get("embedding") == "single" else "late-interaction",
                     str(config.get("backbone"))]}
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    if hub:
        meta["datasets"] = hub
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             "A visual document retriever trained with [ColIntern](https://github.com/colintern/colintern): it embeds "
             "text queries and page images, and ranks pages by "
             + ("the dot product of one vector each." if config.get("embedding") == "single" else
                "late interaction (MaxSim over token vectors), as ColPali does."), "", "## Training", "",
             "| | |", "| --- | --- |", *[f"| {what} | {value} |" for what, value in training_rows(payload, base_model)], ""]
    if summaries:
        lines += ["## Scores", ""]
        for name, summary in summaries:
            lines += [f"`eval.py` on {summary.get('benchmark')} ({name}; main metric {summary['main_metric']}):", "",
                      "```", format_table(summary), "```", ""]
    lines += ["## Use it", "", "With ColIntern (`pip install colintern`):", "", "```python",
              "from colintern import ColIntern", "", f"model = ColIntern.from_pretrained({repo_id!r})",
              "queries = model.encode_queries([\"where is the warranty period?\"])",
              "pages = model.encode_images([page_image])          # PIL images of pages",
              "from colintern.retriever.scoring import maxsim", "scores = maxsim(queries, pages)", "```", "",
              "```bash", f"python search.py index --model_id {repo_id} --inputs my_pdfs/ --index outputs/index",
              "python search.py serve --index outputs/index", "```", "",
              *sentence_transformers_usage(config, repo_id, st_extra_tokens),
              "With mteb: `mteb_model_meta.py` in this folder is the model's reference implementation (its ModelMeta, "
              "declaring MaxSim, the dimension and the training data's overlap with mteb tasks), loaded through "
              "ColIntern.", "", "## Upload", "", "```bash",
              f"hf upload {repo_id} {folder} .", "```", ""]
    return "\n".join(lines)

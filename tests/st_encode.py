"""Encode queries and pages with sentence-transformers alone, in a process where colintern cannot be imported
(tests/test_st_export.py runs it):

    python tests/st_encode.py FOLDER QUERIES.json PAGES_DIR OUT.npz

Writes query_<i> and page_<i> arrays (tokens, dim) float32 and sentence-transformers' scores (queries, pages) to
OUT.npz.

transformers builds a video processor for every InternVL and Qwen3-VL processor, and its video processors exist only
for torchvision, which this machine does not have. Without torchvision the processor is therefore built here as
AutoProcessor.from_pretrained would build it, from the folder's own files (processor_config.json's class,
preprocessor_config.json's image processor on transformers' PIL backend, the tokenizer, chat_template.jinja), with
no video processor; pages never use it. With torchvision installed, or for a processor without video (SmolVLM's
Idefics3Processor), nothing is patched.
"""
from __future__ import annotations

import json
import os
import sys

sys.modules["colintern"] = None  # type: ignore[assignment]  # `import colintern` now raises ImportError


def processor_without_video(folder: str, **kwargs):
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (  # type: ignore[method-assign]
        lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))

    with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
        settings = json.load(f)
    processor_class = getattr(transformers, settings.pop("processor_class"))
    with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    return processor_class(image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
                           tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                           chat_template=template, **settings)


def main(folder: str, queries_file: str, pages_dir: str, out: str) -> None:
    import numpy as np
    import transformers
    from PIL import Image
    from transformers.utils import is_torchvision_available

    try:
        import colintern  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("colintern is importable here; this test must run without it")
    with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
        processor_class = getattr(transformers, json.load(f)["processor_class"])
    if not is_torchvision_available() and "video_processor" in processor_class.get_attributes():
        from sentence_transformers.base.modules import transformer

        transformer.AutoProcessor.from_pretrained = processor_without_video  # type: ignore[method-assign]
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer

    with open(os.path.join(folder, "config_sentence_transformers.json"), encoding="utf-8") as f:
        kind = json.load(f)["model_type"]
    model = (MultiVectorEncoder if kind == "MultiVectorEncoder" else SentenceTransformer)(folder, device="cpu")
    with open(queries_file, encoding="utf-8") as f:
        queries = json.load(f)
    pages = [Image.open(os.path.join(pages_dir, name)).convert("RGB") for name in sorted(os.listdir(pages_dir))]
    arrays = {}
    query_embeddings = model.encode_query(queries, batch_size=2, convert_to_numpy=True)
    page_embeddings = model.encode_document(pages, batch_size=2, convert_to_numpy=True)
    for name, values in (("query", query_embeddings), ("page", page_embeddings)):
        for i, value in enumerate(values):
            arrays[f"{name}_{i}"] = np.asarray(value, dtype=np.float32).reshape(-1, np.shape(value)[-1])
    arrays["scores"] = np.asarray(model.similarity(query_embeddings, page_embeddings), dtype=np.float32)  # (Q, P)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:5])

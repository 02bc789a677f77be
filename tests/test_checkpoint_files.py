"""The published checkpoints' files, as the tiny models cannot show them by default: the original InternVL layout's
tokenizer files (no tokenizer.json), an untied lm_head in an -HF checkpoint, config keys whose defaults change the
model, an image_token_id that is not the tokenizer's, and transformers 5's processor_config.json with Qwen3-VL's
real smallest page (64 visual tokens)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from colintern import ColIntern
from colintern.errors import UserError
from helpers import REPO, max_diff, noisy_page

pytestmark = pytest.mark.usefixtures("one_thread")
PAGES = [noisy_page(224, 300, (255, 0, 0), 1)]
QUERIES = ["red page", "which page shows a green triangle?"]


def embeddings(folder: str, **overrides) -> list[torch.Tensor]:
    model = ColIntern.from_pretrained(folder, max_tiles=2, dim=32, **overrides)
    return model.encode_images(PAGES) + model.encode_queries(QUERIES)


def test_the_remote_layout_ships_its_tokenizer_as_the_original_repositories_do(tiny_remote_dir, tiny_model_dir):
    names = set(os.listdir(tiny_remote_dir))
    assert {"vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"} <= names
    assert "tokenizer.json" not in names
    config = json.loads(open(os.path.join(tiny_remote_dir, "tokenizer_config.json")).read())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    model = ColIntern.from_pretrained(tiny_remote_dir)
    native = ColIntern.from_pretrained(tiny_model_dir)
    for text in ["Query: which page shows the red circle?", "<img><IMG_CONTEXT></img> Describe the document page."]:
        assert model.tokenizer(text)["input_ids"] == native.tokenizer(text)["input_ids"]
    assert max_diff(embeddings(tiny_remote_dir), embeddings(tiny_model_dir)) < 1e-5


def test_an_untied_lm_head_loads_without_an_unexpected_weights_report(tiny_model_dir, tiny_remote_dir):
    """InternVL3.5-1B-HF stores an lm_head apart from the embeddings, and so does the tiny model; retrieval reads
    hidden states only, so neither layout reports it."""
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), "pt") as f:
        head = [k for k in f.keys() if k.endswith("lm_head.weight")]
        embed = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
        assert len(head) == len(embed) == 1
        assert not torch.equal(f.get_tensor(head[0]), f.get_tensor(embed[0]))  # stored apart, different values
    for folder in (tiny_model_dir, tiny_remote_dir):  # a fresh process: transformers' report goes to its stderr
        code = f"from colintern import ColIntern; ColIntern.from_pretrained({folder!r}); print('loaded')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-2000:]
        for word in ("UNEXPECTED", "MISSING", "lm_head"):
            assert word not in out.stdout + out.stderr, (folder, out.stderr[-2000:])


def test_an_image_token_id_that_is_not_the_tokenizers_is_one_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] = config["image_token_id"] + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config image_token_id \d+ is not the tokenizer's <IMG_CONTEXT> id \d+"):
        ColIntern.from_pretrained(str(folder))


def test_an_internvl_chat_config_without_ps_version_is_refused_not_guessed(tiny_remote_dir, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny_remote_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["ps_version"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="lacks ps_version; InternVL's own code would fill in defaults"):
        ColIntern.from_pretrained(str(folder))


def test_qwen3_vl_reads_processor_config_json_and_its_real_smallest_page(tiny_qwen_dir, tmp_path):
    """transformers 5 saves the image processor inside processor_config.json; the real Qwen3-VL's shortest_edge
    (65,536 px = 64 tokens of 32 x 32 px) makes --max_visual_tokens below 64 an error on the real model, and so here."""
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_dir, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 65536, "longest_edge": 16777216}
    (folder / "preprocessor_config.json").unlink()
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": pre,
                                                              "processor_class": "Qwen3VLProcessor"}))
    model = ColIntern.from_pretrained(str(folder), max_visual_tokens=64)
    small = noisy_page(50, 60, (0, 0, 255), 2)  # scaled up to the smallest page the model takes
    assert model.config.min_visual_tokens == 64 and model.processor.page_cost(small) == 64
    # pages that Qwen's minimum puts over a cap of 64 and the cap brings back under the minimum (224 x 300 px: 10 x 8
    # tokens, capped to 9 x 7): the processor must keep that size (it used to scale them up again to the minimum and
    # stop with "processor resized to ...", on the real model too)
    for odd in (noisy_page(224, 300, (0, 255, 0), 3), noisy_page(60, 200, (0, 255, 0), 4)):
        inputs = model.processor.process_images([odd])
        tokens = int(inputs["image_grid_thw"][0].prod()) // 4
        assert tokens == model.processor.page_cost(odd) <= 64
    with pytest.raises(UserError, match="--max_visual_tokens 32 is below this model's smallest page, 64 visual "
                                        "tokens"):
        ColIntern.from_pretrained(str(folder), max_visual_tokens=32)

"""python -m colintern.itr.scenes: deterministic two-object scenes whose stored boxes are the objects' drawn pixels,
whose relations hold by geometry, and whose held-out split has unseen meanings and relation-swapped twins."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from colintern.itr import scenes


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "out"
    scenes.generate(out, n_train=60, n_eval=12, size=160, seed=3)
    return out


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "itr.jsonl").read_text().splitlines()]


def test_the_same_seed_writes_the_same_bytes(scene_dir, tmp_path):
    again = tmp_path / "again"
    scenes.generate(again, n_train=60, n_eval=12, size=160, seed=3)
    for split in ("train", "eval"):
        assert (again / split / "itr.jsonl").read_bytes() == (scene_dir / split / "itr.jsonl").read_bytes()
        for row in rows(scene_dir / split):
            assert (again / split / row["image"]).read_bytes() == (scene_dir / split / row["image"]).read_bytes()


def test_every_stored_box_is_the_bounding_box_of_that_objects_pixels(scene_dir):
    for split in ("train", "eval"):
        for row in rows(scene_dir / split):
            pixels = np.asarray(Image.open(scene_dir / split / row["image"]).convert("RGB"))  # (H, W, 3)
            size = pixels.shape[0]
            for part in ("subject", "object"):
                colour = scenes.COLOURS[row[part]["label"].split()[0]]
                ys, xs = np.nonzero((pixels == colour).all(-1))
                want = [xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size]
                assert np.allclose(row[part]["box"], want, atol=1e-6), (row["image_id"], part)


def test_relations_hold_by_geometry_and_captions_name_them(scene_dir):
    for split in ("train", "eval"):
        for row in rows(scene_dir / split):
            size = 160
            a, b = ((x[0], x[1], x[2] - 1, x[3] - 1)  # back to inclusive pixel boxes
                    for x in ([round(v * size) for v in row[part]["box"]] for part in ("subject", "object")))
            assert scenes.relation_of(a, b) == row["relation"]
            subject, obj, relation = row["subject"]["label"], row["object"]["label"], row["relation"]
            assert row["caption"] == f"a {subject} {relation} a {obj}"
            assert row["captions"][1] == f"a {obj} {scenes.CONVERSE[relation]} a {subject}"
            assert row["phrase"] == f"the {subject} and the {obj}" and relation not in row["phrase"]
            assert row["key"] == scenes.meaning_key(subject, relation, obj) \
                == scenes.meaning_key(obj, scenes.CONVERSE[relation], subject)
            assert subject.split()[0] != obj.split()[0]  # distinct colours: boxes are recoverable from pixels


def test_held_out_meanings_are_unseen_and_every_eval_scene_has_its_twin(scene_dir):
    train, held = rows(scene_dir / "train"), rows(scene_dir / "eval")
    assert len(train) == 60 and len(held) == 24
    assert not {r["key"] for r in train} & {r["key"] for r in held}
    by_id = {r["image_id"]: r for r in held}
    for row in held:
        twin = by_id[row["twin"]]
        assert twin["twin"] == row["image_id"] and twin["relation"] == scenes.CONVERSE[row["relation"]]
        assert (twin["subject"]["label"], twin["object"]["label"]) == (row["subject"]["label"], row["object"]["label"])
        assert twin["phrase"] == row["phrase"] and twin["key"] != row["key"]
    assert {r["relation"] for r in train} == set(scenes.RELATIONS)


def test_a_foreign_folder_is_refused_in_one_line(tmp_path, capsys):
    from colintern.cli import run_cli

    (tmp_path / "mine.txt").write_text("keep me")
    assert run_cli(scenes.main, [str(tmp_path)]) == 2
    assert "is not a colintern.itr.scenes output" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"

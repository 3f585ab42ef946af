"""models.data: folder reading, clear errors, leak-free splits; Emotion6 ground truth (bench)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.emotion6 import label_distributions, read_emotion6_ground_truth
from models.data import (
    ImageRecord,
    group_of,
    load_arrays,
    read_image_folder,
    split_records,
    stratified_split,
    subject_split,
    three_way_split,
)
from models.network import Preprocessing


def _png(path: Path, color=(200, 10, 10), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for cls, n in (("happy", 3), ("anger", 2), ("sadness", 4)):
        for i in range(n):
            _png(root / cls / f"S{100 + i:03d}_001_{i:08d}.png")
    (root / "anger" / "notes.txt").write_text("not an image")
    return root


# --- reading -------------------------------------------------------------------------------
def test_reads_classes_sorted_with_labels(tree: Path) -> None:
    ls = read_image_folder(tree)
    assert ls.classes == ["anger", "happy", "sadness"]
    assert ls.class_counts() == {"anger": 2, "happy": 3, "sadness": 4}  # .txt ignored
    for r in ls.records:
        assert r.path.parent.name == ls.classes[r.label]
    assert ls.records[0].group == "S100"


def test_aliases_and_class_subset_keep_requested_order(tree: Path) -> None:
    ls = read_image_folder(tree, classes=["sadness", "joy"], aliases={"happy": "joy"})
    assert ls.classes == ["sadness", "joy"]
    assert ls.class_counts() == {"sadness": 4, "joy": 3}
    assert {r.path.parent.name for r in ls.records if r.label == 1} == {"happy"}


def test_classes_name_folders_or_their_aliases_alike(tree: Path) -> None:
    """The README's form: ``--classes ...,happy --aliases happy=joy`` (folder names), as well
    as the aliased names; naming a class twice either way is an error."""
    by_folder = read_image_folder(tree, classes=["anger", "happy"], aliases={"happy": "joy"})
    by_alias = read_image_folder(tree, classes=["anger", "joy"], aliases={"happy": "joy"})
    assert by_folder.classes == by_alias.classes == ["anger", "joy"]
    assert by_folder.class_counts() == {"anger": 2, "joy": 3}
    assert [r.path for r in by_folder.records] == [r.path for r in by_alias.records]
    with pytest.raises(ValueError, match="duplicate class names"):
        read_image_folder(tree, classes=["happy", "joy"], aliases={"happy": "joy"})
    with pytest.raises(ValueError, match="unknown class name"):
        read_image_folder(tree, classes=["anger", "fear"], aliases={"happy": "joy"})


def test_emotion6_layout_is_found_under_images(tmp_path: Path) -> None:
    for cls in ("joy", "fear"):
        _png(tmp_path / "e6" / "images" / cls / "1.jpg")
    (tmp_path / "e6" / "ground_truth.txt").write_text("")
    assert read_image_folder(tmp_path / "e6").classes == ["fear", "joy"]


@pytest.mark.parametrize(
    ("setup", "kwargs", "match"),
    [
        ("missing", {}, "not found"),
        ("empty", {}, "no class sub-folders"),
        ("one_class", {}, "at least two classes"),
        ("no_images", {}, "no images found"),
        ("tree", {"classes": ["anger", "contempt"]}, r"unknown class name\(s\) \['contempt'\].*known: \['anger', 'happy', 'sadness'\]"),
        ("tree", {"classes": ["happy"]}, "at least two classes"),
        ("tree", {"classes": ["anger", "anger"]}, "duplicate"),
    ],
)
def test_bad_folders_give_clear_errors(tmp_path: Path, tree: Path, setup, kwargs, match) -> None:
    root = {"tree": tree}.get(setup, tmp_path / setup)
    if setup == "empty":
        root.mkdir()
    elif setup == "one_class":
        _png(root / "happy" / "a.png")
    elif setup == "no_images":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "b" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=match):
        read_image_folder(root, **kwargs)


def test_class_without_images_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "r" / "a" / "1.png")
    _png(tmp_path / "r" / "b" / "1.png")
    (tmp_path / "r" / "c").mkdir()
    with pytest.raises(ValueError, match=r"without images.*\['c'\]"):
        read_image_folder(tmp_path / "r")


def test_unreadable_images_can_be_skipped(tree: Path) -> None:
    bad = tree / "happy" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ls = read_image_folder(tree, check_images=True)
    assert [p.name for p, _ in ls.skipped] == ["broken.png"]
    assert all(r.path != bad for r in ls.records)
    assert len(ls) == 9


def test_load_arrays(tree: Path) -> None:
    ls = read_image_folder(tree)
    prep = Preprocessing(img_size=16)
    arr = load_arrays(ls.records, prep)
    assert arr.shape == (9, 16, 16, 3) and arr.dtype == np.uint8


# --- splits --------------------------------------------------------------------------------
def _recs(labels, groups=None) -> list[ImageRecord]:
    groups = groups or [f"g{i}" for i in range(len(labels))]
    return [ImageRecord(Path(f"{i}.png"), int(y), g) for i, (y, g) in enumerate(zip(labels, groups, strict=True))]


def test_stratified_split_is_per_class_disjoint_and_seeded() -> None:
    recs = _recs([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = stratified_split(recs, 0.2, seed=3)
    assert sorted(tr + va) == list(range(100)) and not set(tr) & set(va)
    assert Counter(recs[i].label for i in va) == {0: 10, 1: 6, 2: 4}
    assert stratified_split(recs, 0.2, seed=3) == (tr, va)
    assert stratified_split(recs, 0.2, seed=4) != (tr, va)
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(recs, 1.0)


def test_subject_split_never_shares_a_group() -> None:
    rng = np.random.default_rng(0)
    groups = [f"S{int(g):03d}" for g in rng.integers(0, 30, 300)]
    recs = _recs(rng.integers(0, 4, 300).tolist(), groups)
    tr, va = subject_split(recs, 0.25, seed=1)
    assert sorted(tr + va) == list(range(300))
    assert not {recs[i].group for i in tr} & {recs[i].group for i in va}
    assert 0.1 < len(va) / 300 < 0.4
    assert split_records(recs, 0.25, seed=1) == (tr, va)  # groups detected


def test_three_way_split_test_part_does_not_depend_on_val_frac() -> None:
    recs = _recs([0] * 40 + [1] * 40)
    a = three_way_split(recs, 0.1, 0.2, seed=0)
    b = three_way_split(recs, 0.3, 0.2, seed=0)
    assert a[2] == b[2] and len(a[2]) == 16
    assert sorted(a[0] + a[1] + a[2]) == list(range(80))
    with pytest.raises(ValueError, match="< 1"):
        three_way_split(recs, 0.5, 0.5)


def test_group_of_ckplus_names() -> None:
    assert group_of(Path("S005_001_00000011.png")) == "S005"
    assert group_of(Path("joy/12.jpg")) == "joy/12.jpg"


def test_ckplus_subject_split_has_no_leak(data_dir: Path) -> None:
    ls = read_image_folder(data_dir / "ckplus48")
    assert len(ls) == 981 and len(ls.classes) == 7
    assert {r.group for r in ls.records} == {r.path.name.split("_")[0] for r in ls.records}
    for seed in (0, 1):
        tr, va, te = three_way_split(ls.records, 0.15, 0.15, seed=seed)
        parts = [{ls.records[i].group for i in p} for p in (tr, va, te)]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert sorted(tr + va + te) == list(range(len(ls)))
        for p in (va, te):  # every class is represented in the held-out parts
            assert set(ls.labels[p]) == set(range(7))


def test_emotion6_ground_truth(data_dir: Path, tmp_path: Path) -> None:
    gt = read_emotion6_ground_truth(data_dir / "emotion6" / "ground_truth.txt")
    ls = read_image_folder(data_dir / "emotion6")
    assert len(ls) == 1320 and ls.class_counts()["joy"] == 220
    keys = {f"{r.path.parent.name}/{r.path.name}" for r in ls.records}
    assert keys <= set(gt)
    valence, arousal, probs = gt["anger/1.jpg"]
    assert len(probs) == 7 and abs(sum(probs) - 1) < 0.01 and 1 <= valence <= 9
    classes = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    sub = read_image_folder(data_dir / "emotion6", classes=classes)
    dist = label_distributions(sub.records, classes, gt)
    assert dist.shape == (1320, 6) and np.allclose(dist.sum(1), 1, atol=1e-5)
    p = np.array(gt["anger/1.jpg"].probs[:6])  # neutral dropped, renormalised
    assert np.allclose(dist[0], p / p.sum(), atol=1e-6)
    # the folder label is the annotators' majority for only part of the photos
    assert 0.4 < (dist.argmax(1) == sub.labels).mean() < 0.8
    bad = tmp_path / "gt.txt"
    bad.write_text("[image_filename]\t[valence]\nanger/1.jpg\t4.5\t3\n")
    with pytest.raises(ValueError, match="10 tab-separated"):
        read_emotion6_ground_truth(bad)


def test_label_distributions_mapping_and_missing_rows() -> None:
    from bench.emotion6 import Emotion6Truth

    truth = {"joy/a.jpg": Emotion6Truth(5.0, 5.0, (0.1, 0.0, 0.0, 0.5, 0.0, 0.0, 0.4)),
             "fear/b.jpg": Emotion6Truth(5.0, 5.0, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0))}
    recs = [ImageRecord(Path("/x/joy/a.jpg"), 1, "a"), ImageRecord(Path("/x/fear/b.jpg"), 0, "b"),
            ImageRecord(Path("/x/joy/unknown.jpg"), 1, "c")]
    # class order is the caller's, matched to the table's columns by name
    d = label_distributions(recs, ["fear", "joy", "anger"], truth)
    assert np.allclose(d[0], [0.0, 0.5 / 0.6, 0.1 / 0.6])
    assert not d[1].any()  # only neutral votes: no distribution (callers use the folder label)
    assert not d[2].any()  # not in the table
    with pytest.raises(ValueError, match="ground-truth column"):
        label_distributions(recs, ["happy", "sad"], truth)

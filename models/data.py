"""Labelled image sets: read ImageFolder trees, split without leaks, turn images into tensors.

Pure: no Prefect, database or MLflow. The only file access is reading the images and the
Emotion6 ground-truth table the caller points at.

Layouts read by :func:`read_image_folder`:

    <root>/<class>/<image>            ImageFolder (CK+48)
    <root>/images/<class>/<image>     Emotion6 (pass ``<root>/images``, or ``<root>``: an
                                      ``images/`` sub-folder is used when it is there)
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.images import IMAGE_EXTENSIONS, UnreadableImageError, load_rgb
from models.network import Preprocessing

# CK+ file names are S<subject>_<sequence>_<frame>: the subject is the leak unit.
_CK_SUBJECT = re.compile(r"^(S\d+)_")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int
    # Images of one group (a CK+ subject; otherwise the file itself) always stay on one side
    # of a split.
    group: str


@dataclass
class LabelledSet:
    records: list[ImageRecord]
    classes: list[str]
    # Files that looked like images but could not be decoded (only when the reader was asked
    # to check them): (path, reason).
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelledSet:
        return LabelledSet([self.records[int(i)] for i in idx], list(self.classes))


def group_of(path: Path) -> str:
    """The leak unit of an image: the CK+ subject ``S###`` if the name has one, else the file."""
    m = _CK_SUBJECT.match(path.name)
    return m.group(1) if m else str(path)


def read_image_folder(
    root: str | Path,
    classes: Sequence[str] | None = None,
    aliases: Mapping[str, str] | None = None,
    check_images: bool = False,
) -> LabelledSet:
    """Read a ``<root>/<class>/<image>`` tree into records with integer labels.

    aliases: folder name -> class name (e.g. ``{"happy": "joy"}`` to put CK+48 on the
        Emotion6 vocabulary); applied before ``classes`` is matched.
    classes: keep only these classes, labelled in this order; default: every class folder
        (after aliases), sorted. A folder name that has an alias means its alias (``happy``
        with ``{"happy": "joy"}`` is ``joy``): the README's and users' scripts name either.
    check_images: decode every file and move unreadable ones to ``skipped`` instead of
        failing later in training (slow on big trees: one full decode per file).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    if (root / "images").is_dir() and all(d.name == "images" for d in _subdirs(root)):
        root = root / "images"  # Emotion6 layout: <root>/images/<class>/...
    aliases = dict(aliases or {})
    found: dict[str, list[Path]] = defaultdict(list)
    for d in _subdirs(root):
        name = aliases.get(d.name, d.name)
        found[name].extend(
            sorted((f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda f: _natural_key(f.name))
        )
    if not found:
        raise ValueError(f"{root} has no class sub-folders (expected <root>/<class>/<image>)")
    if classes is None:
        names = sorted(found)
    else:
        names = [c if c in found else aliases.get(c, c) for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        unknown = [c for c in names if c not in found]
        if unknown:
            raise ValueError(
                f"unknown class name(s) {unknown} for {root}; known: {sorted(found)}"
                + (f" (aliases applied: {aliases})" if aliases else "")
            )
    empty = [c for c in names if not found[c]]
    if len(empty) == len(names):
        raise ValueError(f"no images found under {root} (suffixes: {sorted(IMAGE_EXTENSIONS)})")
    if empty:
        raise ValueError(f"class folder(s) without images under {root}: {empty}")
    if len(names) < 2:
        raise ValueError(f"need at least two classes to train a classifier, {root} has {names}")
    records, skipped = [], []
    for label, name in enumerate(names):
        for f in found[name]:
            if check_images:
                try:
                    load_rgb(f)
                except UnreadableImageError as e:
                    skipped.append((f, str(e)))
                    continue
            records.append(ImageRecord(path=f, label=label, group=group_of(f)))
    return LabelledSet(records=records, classes=names, skipped=skipped)


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --- splits ----------------------------------------------------------------------------------
def _check_frac(val_frac: float) -> None:
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {val_frac}")


def stratified_split(
    records: Sequence[ImageRecord], val_frac: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``val_frac`` of each class goes to val (at least one per class
    with two or more images). Use for sets where every image is its own group."""
    _check_frac(val_frac)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_class[r.label].append(i)
    train, val = [], []
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        n_val = int(round(val_frac * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def subject_split(
    records: Sequence[ImageRecord], val_frac: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices (train, val) such that no group (CK+ subject) is on both sides.

    Groups are shuffled and assigned greedily: each goes to val while that keeps every class
    of the group below its val quota (``val_frac`` of the class), so class proportions stay
    close to ``val_frac`` even though subjects contribute unevenly to classes.
    """
    _check_frac(val_frac)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.group].append(i)
    if len(groups) < 2:
        raise ValueError("subject_split needs at least two groups (subjects)")
    labels = np.array([r.label for r in records])
    k = int(labels.max()) + 1
    quota = val_frac * np.bincount(labels, minlength=k)
    taken = np.zeros(k)
    names = sorted(groups)
    order = rng.permutation(len(names))
    val_groups: set[str] = set()
    for j in order:
        g = names[j]
        counts = np.bincount(labels[groups[g]], minlength=k)
        if np.all(taken + counts <= quota + 0.5):
            val_groups.add(g)
            taken += counts
    if not val_groups:  # val_frac too small for any group: take the smallest one
        val_groups.add(min(names, key=lambda g: len(groups[g])))
    if len(val_groups) == len(names):
        val_groups.discard(names[order[-1]])
    val = sorted(i for g in val_groups for i in groups[g])
    vs = set(val)
    train = [i for i in range(len(records)) if i not in vs]
    return train, val


def has_groups(records: Sequence[ImageRecord]) -> bool:
    """True when some group holds more than one image (then split by group)."""
    seen: set[str] = set()
    for r in records:
        if r.group in seen:
            return True
        seen.add(r.group)
    return False


def split_records(
    records: Sequence[ImageRecord], val_frac: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """subject_split when images share groups, stratified_split otherwise."""
    if has_groups(records):
        return subject_split(records, val_frac, seed)
    return stratified_split(records, val_frac, seed)


def three_way_split(
    records: Sequence[ImageRecord], val_frac: float, test_frac: float, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Indices (train, val, test) with the same leak rule as :func:`split_records`.

    test_frac and val_frac are fractions of the whole set; the test part is cut first so
    that it does not depend on val_frac (same seed, same test photos).
    """
    _check_frac(test_frac)
    _check_frac(val_frac)
    if val_frac + test_frac >= 1.0:
        raise ValueError(f"val_frac + test_frac must be < 1, got {val_frac + test_frac}")
    rest, test = split_records(records, test_frac, seed)
    sub = [records[i] for i in rest]
    tr, va = split_records(sub, val_frac / (1.0 - test_frac), seed + 1)
    return [rest[i] for i in tr], [rest[i] for i in va], test


# --- images -> arrays / tensors ----------------------------------------------------------------
def load_arrays(
    paths: Sequence[str | Path] | Sequence[ImageRecord], prep: Preprocessing
) -> np.ndarray:
    """Decode and resize images -> uint8 (N, S, S, 3) (the pixel grid the model sees)."""
    out = np.empty((len(paths), prep.img_size, prep.img_size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        path = p.path if isinstance(p, ImageRecord) else p
        out[i] = prep.to_array(load_rgb(path))
    return out



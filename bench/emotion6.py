"""Emotion6's annotator votes (``ground_truth.txt``), used by the training benchmarks only
(``bench/train_sweep.py``: soft labels did not help, docs/benchmarks.md); the product reads
the folder labels."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data import ImageRecord

# --- Emotion6 ground truth -------------------------------------------------------------------
EMOTION6_GT_COLUMNS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")


@dataclass(frozen=True)
class Emotion6Truth:
    valence: float
    arousal: float
    # The annotators' emotion distribution over EMOTION6_GT_COLUMNS (7 values, sum ~1).
    probs: tuple[float, ...]

    def __iter__(self) -> Iterator:  # unpacks as (valence, arousal, probs)
        return iter((self.valence, self.arousal, self.probs))


def read_emotion6_ground_truth(path: str | Path) -> dict[str, Emotion6Truth]:
    """``ground_truth.txt`` -> {"anger/1.jpg": (valence, arousal, probs[7])}.

    The key is the path relative to the ``images/`` folder, with forward slashes.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.txt"
    if not p.is_file():
        raise ValueError(f"Emotion6 ground truth not found: {p}")
    out: dict[str, Emotion6Truth] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip() or line.startswith("["):  # header: [image_filename] ...
            continue
        parts = line.split("\t")
        if len(parts) != 10:
            raise ValueError(f"{p}:{i + 1}: expected 10 tab-separated fields, got {len(parts)}")
        try:
            vals = [float(x) for x in parts[1:]]
        except ValueError as e:
            raise ValueError(f"{p}:{i + 1}: {e}") from e
        out[parts[0].strip().replace("\\", "/")] = Emotion6Truth(vals[0], vals[1], tuple(vals[2:]))
    if not out:
        raise ValueError(f"{p}: no rows")
    return out


def label_distributions(
    records: Sequence[ImageRecord], classes: Sequence[str], truth: Mapping[str, Emotion6Truth]
) -> np.ndarray:
    """(N, K) annotator distributions over ``classes`` for each record (Emotion6 votes).

    A record is looked up by ``<class folder>/<file name>`` (the ground-truth key). Classes
    are matched to the ground-truth columns by name; votes for other columns (e.g. neutral)
    are dropped and each row renormalised. A row is all zeros when the file is not in the
    table or no annotator voted for any of ``classes``: callers fall back to the folder label.
    """
    cols = [EMOTION6_GT_COLUMNS.index(c) if c in EMOTION6_GT_COLUMNS else -1 for c in classes]
    if all(c < 0 for c in cols):
        raise ValueError(f"none of the classes {list(classes)} is an Emotion6 ground-truth "
                         f"column {list(EMOTION6_GT_COLUMNS)}")
    out = np.zeros((len(records), len(classes)), dtype=np.float32)
    for i, r in enumerate(records):
        t = truth.get(f"{Path(r.path).parent.name}/{Path(r.path).name}")
        if t is None:
            continue
        row = np.array([t.probs[c] if c >= 0 else 0.0 for c in cols], dtype=np.float32)
        if row.sum() > 0:
            out[i] = row / row.sum()
    return out


__all__ = ["EMOTION6_GT_COLUMNS", "Emotion6Truth", "label_distributions", "read_emotion6_ground_truth"]

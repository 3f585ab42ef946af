"""The reference profile: what the training domain looks like to one model version.

Bottleneck features and softmax outputs of a HELD-OUT sample of the training domain (never
trained on, so the reference is not tighter than fresh data from the same domain would be;
otherwise the drift test would fire on clean data), plus per-image quality statistics so a
drift report can say *how* site images differ. Saved with every model (``to_npz``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "emowatch-reference-profile/1"


@dataclass
class ReferenceProfile:
    features: np.ndarray  # (n, D) float32 bottleneck features
    probs: np.ndarray  # (n, K) float32 softmax outputs
    classes: list[str]
    quality: dict[str, np.ndarray] | None = None  # stat name -> (n,) float64
    info: dict[str, Any] = field(default_factory=dict)  # model key, sample description, ...
    # the fitted accuracy estimator as plain arrays (models.estimate.base.Estimator.state());
    # None for profiles saved before estimators existed (checks then say "no estimate")
    estimator: dict[str, np.ndarray] | None = None
    # (k, T, T, 3) uint8 thumbnails of typical training-domain images (reports show them beside
    # a site's atypical ones); None for profiles saved before they were kept
    thumbnails: np.ndarray | None = None
    # The site twin's labelled images (models.estimate.twin): held-out training-domain images
    # never used to pick the epoch (the test split), as their original encoded files
    # ("bytes" uint8, "offsets" int64 N+1, "labels" int64 N). Carried to every adapted version;
    # None for profiles saved before the twin existed (no twin estimate).
    twin: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        if self.features.ndim != 2 or self.probs.ndim != 2:
            raise ValueError("features and probs must be 2-D (n, D) and (n, K)")
        if len(self.features) != len(self.probs):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.probs)} prob rows")
        if self.probs.shape[1] != len(self.classes):
            raise ValueError(f"probs have {self.probs.shape[1]} columns for {len(self.classes)} classes")
        if self.quality is not None:
            self.quality = {k: np.asarray(v, dtype=np.float64) for k, v in self.quality.items()}
            bad = [k for k, v in self.quality.items() if len(v) != len(self.features)]
            if bad:
                raise ValueError(f"quality statistics {bad} do not have {len(self.features)} values")

    def __len__(self) -> int:
        return len(self.features)

    def accuracy_estimator(self) -> Any:
        """The fitted ``models.estimate.base.Estimator`` (built once), or None."""
        if self.estimator is None:
            return None
        cached = self.__dict__.get("_estimator")
        if cached is None:
            from models.estimate.base import estimator_from_state

            cached = self.__dict__["_estimator"] = estimator_from_state(self.estimator)
        return cached

    @classmethod
    def from_arrays(cls, features: Any, probs: Any, classes: list[str],
                    quality: dict[str, Any] | None = None, info: dict[str, Any] | None = None
                    ) -> ReferenceProfile:
        return cls(np.asarray(features), np.asarray(probs), list(classes),
                   None if quality is None else dict(quality), dict(info or {}))

    # --- explicit save / load ---------------------------------------------------------------
    def to_npz(self, path: str | Path) -> None:
        arrays: dict[str, Any] = {"features": self.features, "probs": self.probs}
        for k, v in (self.quality or {}).items():
            arrays[f"quality__{k}"] = v
        for k, v in (self.estimator or {}).items():
            arrays[f"est__{k}"] = v
        if self.thumbnails is not None:
            arrays["thumbnails"] = np.asarray(self.thumbnails, np.uint8)
        for k, v in (self.twin or {}).items():
            arrays[f"twin__{k}"] = v
        meta = {"format": FORMAT, "classes": self.classes, "info": self.info}
        np.savez_compressed(Path(path), meta=np.asarray(json.dumps(meta)), **arrays)

    @classmethod
    def from_npz(cls, path: str | Path) -> ReferenceProfile:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not an emowatch reference profile")
            quality = {k.removeprefix("quality__"): z[k] for k in z.files if k.startswith("quality__")}
            est = {k.removeprefix("est__"): z[k] for k in z.files if k.startswith("est__")}
            thumbs = z["thumbnails"] if "thumbnails" in z.files else None
            twin = {k.removeprefix("twin__"): z[k] for k in z.files if k.startswith("twin__")}
            return cls(z["features"], z["probs"], list(meta["classes"]), quality or None,
                       dict(meta.get("info", {})), est or None, thumbs, twin or None)

    # --- the site twin's images ---------------------------------------------------------------
    def set_twin_images(self, files: list[bytes], labels: list[int]) -> None:
        """Keep these encoded image files (and labels) as the twin's labelled images."""
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} twin images but {len(labels)} labels")
        offsets = np.cumsum([0] + [len(b) for b in files]).astype(np.int64)
        self.twin = {"bytes": np.frombuffer(b"".join(files), np.uint8).copy(),
                     "offsets": offsets, "labels": np.asarray(labels, np.int64)}

    def twin_images(self, prep: Any, limit: int | None = None
                    ) -> tuple[list[np.ndarray], np.ndarray] | None:
        """The twin's labelled images on the model's grid (``prep``: the version's
        preprocessing) and their labels (the first ``limit``), or None when the profile keeps
        none."""
        if not self.twin:
            return None
        import io

        from PIL import Image

        raw, off = self.twin["bytes"], self.twin["offsets"]
        n = len(off) - 1 if limit is None else min(limit, len(off) - 1)
        images = []
        for i in range(n):
            with Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())) as im:
                images.append(prep.to_array(im))
        return images, np.asarray(self.twin["labels"][:n], np.int64)


def typical_indices(features: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows nearest the mean feature (the most typical images), nearest first."""
    z = np.asarray(features, np.float64)
    d = ((z - z.mean(0)) ** 2).sum(1)
    return np.argsort(d, kind="stable")[: max(0, min(k, len(z)))]


def thumbnail_array(img: Any, size: int = 64) -> np.ndarray:
    """A PIL image centre-cropped to a square and resized: (size, size, 3) uint8."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.convert("RGB").crop(box).resize((size, size), Image.BILINEAR),
                      np.uint8)


def build_reference_profile(checkpoint: Any, images: Any, max_n: int = 1000, seed: int = 0,
                            batch_size: int = 32) -> ReferenceProfile:
    """Features and softmax of up to ``max_n`` held-out images (seeded subsample).

    images: anything :func:`models.evaluate.extract_features` takes (paths, records, uint8)."""
    from models.evaluate import extract_features

    n = len(images)
    if n < 2:
        raise ValueError(f"a reference profile needs at least 2 held-out images, got {n}")
    idx = np.arange(n)
    if n > max_n:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))
        images = images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]
    z, p = extract_features(checkpoint, images, batch_size=batch_size)
    return ReferenceProfile(z, p, list(checkpoint.classes),
                            info={"n": int(len(z)), "seed": seed, "subsampled_from": int(n)})

"""Training views of labelled images and their cached frozen activations.

Each training image gives ``1 + flip + crops`` views (the image, its mirror and random crops,
each crop mirrored with p = 0.5); ``cache_activations`` runs every view through the frozen
part once and keeps the activations (float16): epochs then draw one cached view per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from models.data import ImageRecord, LabelledSet
from models.engine import frozen_runner
from models.images import load_rgb
from models.network import EmotionNet, Preprocessing
from models.progress import Progress


class ViewSpec(Protocol):
    """What makes the views (``models.train.TrainConfig`` has these)."""

    flip: bool
    crops: int
    crop_scale: tuple[float, float]
    cache_batch: int


# --- input sources ---------------------------------------------------------------------------
@dataclass
class ImageSource:
    """Uniform access to file records or in-memory uint8 images."""

    labels: np.ndarray  # (N,)
    records: list[ImageRecord] | None = None
    images: np.ndarray | Sequence[np.ndarray] | None = None  # uint8 (N,H,W,3)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, i: int) -> Image.Image:
        if self.records is not None:
            return load_rgb(self.records[i].path)
        a = np.asarray(self.images[i])
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        return Image.fromarray(a)

    def subset(self, idx: Sequence[int]) -> ImageSource:
        idx = list(idx)
        return ImageSource(
            labels=self.labels[idx],
            records=[self.records[i] for i in idx] if self.records is not None else None,
            images=[self.images[i] for i in idx] if self.images is not None else None,
        )


def as_source(data: Any, labels: Any = None) -> tuple[ImageSource, list[str] | None]:
    """LabelledSet | [ImageRecord] | object with .images/.labels | (images, labels)."""
    if isinstance(data, LabelledSet):
        return ImageSource(labels=data.labels, records=list(data.records)), list(data.classes)
    if isinstance(data, tuple) and len(data) == 2 and labels is None:
        data, labels = data
    if hasattr(data, "images") and hasattr(data, "labels") and labels is None:
        classes = list(data.classes) if hasattr(data, "classes") else None
        return as_source(data.images, data.labels)[0], classes
    if isinstance(data, Sequence) and data and isinstance(data[0], ImageRecord):
        return ImageSource(labels=np.array([r.label for r in data]), records=list(data)), None
    if isinstance(data, np.ndarray) or (isinstance(data, Sequence) and data
                                        and isinstance(data[0], np.ndarray)):
        if labels is None:
            raise ValueError("in-memory images need labels: pass (images, labels)")
        y = np.asarray(labels, dtype=np.int64).ravel()
        if len(y) != len(data):
            raise ValueError(f"{len(data)} images but {len(y)} labels")
        first = np.asarray(data[0]) if len(data) else None
        if first is not None and first.dtype != np.uint8:
            raise ValueError(f"in-memory images must be uint8 (N,H,W,3), got {first.dtype}")
        return ImageSource(labels=y, images=data), None
    raise ValueError(
        "training data must be a LabelledSet, a list of ImageRecord, an object with "
        ".images/.labels, or (uint8 images (N,H,W,3), labels)"
    )


# --- view generation and caching -------------------------------------------------------------
def random_crop(img: Image.Image, scale: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    area = w * h * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(min(w, math.sqrt(area * ratio))))
    ch = int(round(min(h, math.sqrt(area / ratio))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def image_views(img: Image.Image, prep: Preprocessing, cfg: ViewSpec, rng: np.random.Generator,
           augment: bool) -> list[np.ndarray]:
    base = prep.to_array(img)  # (S,S,3)
    if not augment:
        return [base]
    out = [base]
    if cfg.flip:
        out.append(base[:, ::-1])
    for _ in range(cfg.crops):
        v = prep.to_array(random_crop(img, cfg.crop_scale, rng))
        if cfg.flip and rng.random() < 0.5:
            v = v[:, ::-1]
        out.append(v)
    return out


def n_views(cfg: ViewSpec) -> int:
    return 1 + int(cfg.flip) + cfg.crops


@torch.no_grad()
def cache_activations(
    model: EmotionNet,
    src: ImageSource,
    prep: Preprocessing,
    cfg: ViewSpec,
    augment: bool,
    seed: int,
    progress: Progress | None = None,
    stage: str = "cache",
    engine: str = "auto",
    engine_cache: Any = None,
) -> torch.Tensor:
    """Frozen activations of every view: (N, V, C, h, w) float16 (V = 1 without augment), in
    the engine ``models.engine.frozen_runner`` picks (ONNX Runtime for fp32 where it is
    installed)."""
    rng = np.random.default_rng(seed)
    v = n_views(cfg) if augment else 1
    model.eval()
    out: torch.Tensor | None = None
    n = len(src)
    run = frozen_runner(model, prep.img_size, engine, engine_cache, n_images=n * v)
    for s in range(0, n, cfg.cache_batch):
        arrs = []
        for i in range(s, min(n, s + cfg.cache_batch)):
            arrs.extend(image_views(src.pil(i), prep, cfg, rng, augment))
        h = run(prep.normalize(np.ascontiguousarray(np.stack(arrs))))
        h = h.to(torch.float16).view(-1, v, *h.shape[1:])
        if out is None:
            out = torch.empty((n, v, *h.shape[2:]), dtype=torch.float16)
        out[s:s + h.shape[0]] = h
        if progress:
            progress({"stage": stage, "done": min(n, s + cfg.cache_batch), "total": n})
    assert out is not None
    return out


__all__ = ["ImageSource", "ViewSpec", "as_source", "cache_activations", "image_views", "n_views",
           "random_crop"]

"""The featurize cache (``image_features``): bottleneck features + softmax + quality statistics
of an image under one model version, keyed by (sha256, ``"<name>/<version>"``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ImageFeature, utcnow
from db.sql import chunked, dialect_insert


def to_blob(a: Any) -> bytes:
    """A 1-D vector as float32 little-endian bytes (the cache's storage format)."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"cached vectors must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def from_blob(b: bytes) -> np.ndarray:
    """Inverse of :func:`to_blob`: a writable (D,) float32 array."""
    if len(b) % 4:
        raise ValueError(f"a float32 blob has a multiple of 4 bytes, got {len(b)}")
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class CachedFeatures:
    features: np.ndarray  # (D,) float32
    probs: np.ndarray  # (K,) float32
    quality: dict[str, Any] = field(default_factory=dict)


def get_features(
    session: Session, shas: Iterable[str], model_key: str
) -> dict[str, CachedFeatures]:
    """Cached features of the images ``shas`` under ``model_key``; missing ones are absent."""
    keys = sorted(set(shas))
    out: dict[str, CachedFeatures] = {}
    for part in chunked(keys):
        q = select(
            ImageFeature.sha256, ImageFeature.features, ImageFeature.probs, ImageFeature.quality
        )
        q = q.where(ImageFeature.model_key == model_key, ImageFeature.sha256.in_(part))
        for sha, f, p, qual in session.execute(q):
            out[sha] = CachedFeatures(from_blob(f), from_blob(p), dict(qual or {}))
    return out


def get_feature(session: Session, sha256: str, model_key: str) -> CachedFeatures | None:
    return get_features(session, [sha256], model_key).get(sha256)


def put_features(
    session: Session,
    model_key: str,
    items: Iterable[tuple[str, Any, Any] | tuple[str, Any, Any, Mapping[str, Any]]],
) -> int:
    """Cache ``(sha256, features (D,), probs (K,)[, quality])`` under ``model_key``.

    Entries already cached are kept as they are (features of an image under one model version
    never change); returns how many were new."""
    if not model_key:
        raise ValueError("model_key must be non-empty (e.g. 'emowatch-site-a/3')")
    now = utcnow()
    rows = []
    for it in items:
        sha, f, p = it[0], it[1], it[2]
        qual = dict(it[3]) if len(it) > 3 else {}  # type: ignore[arg-type]
        rows.append(
            {
                "sha256": sha,
                "model_key": model_key,
                "features": to_blob(f),
                "probs": to_blob(p),
                "quality": qual,
                "created_at": now,
                "updated_at": now,
            }
        )
    if not rows:
        return 0
    stmt = (
        dialect_insert(session, ImageFeature)
        .on_conflict_do_nothing(index_elements=[ImageFeature.sha256, ImageFeature.model_key])
        .returning(ImageFeature.id)
    )
    return len(list(session.execute(stmt, rows).scalars()))


__all__ = ["CachedFeatures", "from_blob", "get_feature", "get_features", "put_features", "to_blob"]

"""Evidently reports for a site's drift check (evidently 0.7.x API).

Evidently's column-wise tests are built for tables, not for 256-D image features, so the report
shows a *compact view* of each image:

* ``pc_1..pc_k``      the first k principal components of the bottleneck features, fitted on
                        the reference (a fixed projection, so reports over time are comparable);
* ``pred_class``      the model's predicted class (categorical) and ``confidence`` (max softmax);
* quality statistics  brightness, contrast, sharpness, ... (models.quality), the columns a
                        site operator understands;
* ``z_0..z_{D-1}``    optionally the raw features, for Evidently's own embeddings-drift metric.

The decision emowatch acts on is models.drift.base (MMD + BBSD); this report is what a person reads,
and bench/drift.py measures how Evidently's own decisions on the same data compare.

Functions here are pure (DataFrames/arrays in, Evidently objects out) except ``save_report``
and ``add_to_workspace``, which write files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.quality import STAT_NAMES

# 10 components keep most of the variance of a 256-D bottleneck on our data while keeping the
# report readable (one drift row per component) and Evidently's per-column tests well-powered.
DEFAULT_PCA_COMPONENTS = 10
# Evidently's default: the dataset is "drifted" when >= half the columns drifted.
DEFAULT_DRIFT_SHARE = 0.5
EMBEDDINGS_NAME = "bottleneck"


@dataclass(frozen=True)
class PCAProjection:
    """A linear projection fitted on the reference features (numpy, no sklearn state)."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D) orthonormal rows, by decreasing variance
    explained_variance_ratio: np.ndarray  # (k,)

    @classmethod
    def fit(cls, z_ref: np.ndarray, n_components: int = DEFAULT_PCA_COMPONENTS) -> PCAProjection:
        z = np.asarray(z_ref, dtype=np.float64)
        if z.ndim != 2 or len(z) < 2:
            raise ValueError(f"z_ref must be (N>=2, D), got shape {z.shape}")
        k = min(n_components, z.shape[1], len(z) - 1)
        mean = z.mean(0)
        _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
        var = s**2
        # Sign convention: the largest loading of each component is positive (stable across runs).
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
        vt = vt * signs[:, None]
        return cls(mean, vt[:k], var[:k] / var.sum())

    def transform(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (N, {self.mean.shape[0]}), got shape {z.shape}")
        return (z - self.mean) @ self.components.T  # (N, k)


def monitoring_frame(
    z: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    pca: PCAProjection,
    quality: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    include_embeddings: bool = False,
) -> pd.DataFrame:
    """The compact per-image view a report is built on (one row per image)."""
    z, probs = np.asarray(z), np.asarray(probs)
    if len(z) != len(probs):
        raise ValueError(f"{len(z)} feature rows but {len(probs)} probability rows")
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)}), got shape {probs.shape}")
    pcs = pca.transform(z)
    cols: dict[str, Any] = {f"pc_{i + 1}": pcs[:, i] for i in range(pcs.shape[1])}
    cols["pred_class"] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    cols["confidence"] = probs.max(1).astype(np.float64)
    for name in STAT_NAMES if quality is not None else ():
        if name in quality:
            v = np.asarray(quality[name], dtype=np.float64)
            if len(v) != len(z):
                raise ValueError(f"quality[{name!r}] has {len(v)} values for {len(z)} images")
            cols[name] = v
    if include_embeddings:
        cols.update({f"z_{j}": z[:, j].astype(np.float64) for j in range(z.shape[1])})
    return pd.DataFrame(cols)


def split_columns(frame: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(numerical, categorical, embedding) columns of a monitoring frame."""
    emb = [c for c in frame.columns if c.startswith("z_")]
    cat = [c for c in frame.columns if c == "pred_class"]
    num = [c for c in frame.columns if c not in emb and c not in cat]
    return num, cat, emb


def _datasets(ref_frame: pd.DataFrame, cur_frame: pd.DataFrame, with_embeddings: bool):
    from evidently import DataDefinition, Dataset

    if list(ref_frame.columns) != list(cur_frame.columns):
        raise ValueError("reference and current frames must have the same columns")
    if len(ref_frame) < 2 or len(cur_frame) < 2:
        raise ValueError("reference and current frames need at least 2 rows each")
    num, cat, emb = split_columns(ref_frame)
    definition = DataDefinition(
        numerical_columns=num,
        categorical_columns=cat,
        embeddings={EMBEDDINGS_NAME: emb} if (emb and with_embeddings) else None,
    )
    return (
        Dataset.from_pandas(ref_frame, data_definition=definition),
        Dataset.from_pandas(cur_frame, data_definition=definition),
        num + cat,
        emb,
    )


def build_drift_report(
    ref_frame: pd.DataFrame,
    cur_frame: pd.DataFrame,
    embeddings: bool = False,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    timestamp: datetime | None = None,
    name: str | None = None,
    metadata: Mapping[str, str | float | int] | None = None,
):
    """Evidently snapshot: DataDriftPreset on the compact columns (+ EmbeddingsDrift on z_*).

    ``timestamp`` places the snapshot on the workspace's time axis (default: now).
    ``embeddings=True`` adds Evidently's EmbeddingsDrift metric on the z_* columns; it is off by
    default because that metric always fits a t-SNE for its plot (~15-60 s on 2 cores for a
    few hundred images), far more than the rest of the report (~1 s).
    """
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    if list(ref_frame.columns) != list(cur_frame.columns):
        raise ValueError("reference and current frames must have the same columns")
    if not embeddings:
        keep = [c for c in ref_frame.columns if not c.startswith("z_")]
        ref_frame, cur_frame = ref_frame[keep], cur_frame[keep]
    ref, cur, columns, emb = _datasets(ref_frame, cur_frame, embeddings)
    metrics: list[Any] = [DataDriftPreset(columns=columns, drift_share=drift_share)]
    if embeddings and emb:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME))
    report = Report(metrics, metadata=dict(metadata or {}))
    return report.run(cur, ref, timestamp=timestamp, name=name)


def dataset_drift(snapshot: Any) -> dict[str, Any]:
    """The preset's own dataset-level decision, read from a snapshot.

    Evidently calls the dataset drifted when the share of drifted columns >= drift_share
    (legacy/calculations/data_drift.py); per-column values are the p-values (or distances, for
    references over 1000 rows) of the automatically chosen tests.
    """
    out: dict[str, Any] = {"per_column": {}}
    for m in snapshot.dict()["metrics"]:
        cfg, val = m["config"], m["value"]
        kind = cfg.get("type", "")
        if kind.endswith(":DriftedColumnsCount"):
            out.update(
                n_drifted=int(val["count"]), share=float(val["share"]),
                drift_share=float(cfg["drift_share"]),
            )
        elif kind.endswith(":ValueDrift"):
            out["per_column"][cfg["column"]] = {
                "method": cfg.get("method"), "value": float(val), "threshold": cfg.get("threshold")
            }
        elif kind.endswith(":EmbeddingsDrift"):
            out["embeddings_score"] = float(val)
    if "share" not in out:
        raise ValueError("snapshot has no DataDriftPreset result")
    out["is_drift"] = bool(out["share"] >= out["drift_share"])
    return out


# --- I/O -----------------------------------------------------------------------------------------
def save_report(snapshot: Any, html_path: str | Path | None, json_path: str | Path | None) -> None:
    """Write the snapshot as a standalone HTML page and/or its JSON results."""
    for p in (html_path, json_path):
        if p is not None:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    if html_path is not None:
        snapshot.save_html(str(html_path))
    if json_path is not None:
        snapshot.save_json(str(json_path))


def add_to_workspace(
    workspace_dir: str | Path, project_name: str, snapshot: Any, description: str | None = None
) -> str:
    """Add the snapshot to the local Evidently workspace, one project per site (created once).

    ``evidently ui --workspace <workspace_dir>`` then shows each site's reports over time.
    Returns the snapshot id.

    Written with the workspace's own file layout (``LocalState``) rather than through
    ``Workspace``: opening a ``Workspace`` parses every snapshot of every project (~80 ms each
    here), so a check's cost grew with the monitor's age -- 0.4 s with 1 snapshot, 1.0 s with
    12; a year of hourly drifting checks at 100 sites would be hours per check. Here only the
    projects' small metadata files are read.
    """
    import fcntl

    from evidently.legacy.core import new_id
    from evidently.sdk.models import ProjectModel
    from evidently.ui.storage.local.base import LocalState

    Path(workspace_dir).mkdir(parents=True, exist_ok=True)
    state = LocalState(str(workspace_dir))
    # One writer at a time: two checks of one site finishing together must not both create
    # its project (measured: the bench/scale.py runs lost snapshots before this lock).
    with open(Path(workspace_dir) / ".emowatch-write.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        project_id = _project_id(state, str(workspace_dir), project_name)
        if project_id is None:
            project = state.write_project(ProjectModel(
                name=project_name,
                description=description or f"emowatch drift reports for site {project_name}"))
            project_id = project.id
            _PROJECTS[(str(workspace_dir), project_name)] = str(project_id)
        snapshot_id = new_id()
        state.write_snapshot(project_id, snapshot_id, snapshot.to_snapshot_model())
    return str(snapshot_id)


_PROJECTS: dict[tuple[str, str], str] = {}  # (workspace, site) -> project id, per process


def _project_id(state: Any, workspace: str, name: str) -> str | None:
    """The id of the workspace's project called ``name`` (None: none yet)."""
    known = _PROJECTS.get((workspace, name))
    if known is not None:
        try:
            if state.read_project(known).name == name:
                return known
        except (OSError, ValueError):
            pass  # deleted or rewritten since: look again
    for pid in state.list_projects():
        try:
            if state.read_project(pid).name == name:
                _PROJECTS[(workspace, name)] = str(pid)
                return str(pid)
        except (OSError, ValueError):
            continue  # a project being written by the UI: not ours
    return None


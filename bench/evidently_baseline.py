"""Evidently's own drift decisions, as baselines for ``bench/drift.py`` (the product decides
with ``models.drift`` and uses Evidently only for the report a person reads,
``tasks.reports.evidently``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.reports.evidently import (
    DEFAULT_DRIFT_SHARE,
    build_drift_report,
    dataset_drift,
    split_columns,
)


def evidently_decision(
    ref_frame: pd.DataFrame,
    cur_frame: pd.DataFrame,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    fast: bool = False,
) -> dict[str, Any]:
    """DataDriftPreset's dataset-drift decision on the compact columns (z_* ignored).

    ``fast=True`` runs the same per-column tests (Evidently's automatic choice of test and its
    default thresholds, via its own stattest registry, as legacy ``get_one_column_drift`` does)
    without building a Report: ~50x faster, for benchmarks; tests check that both agree.
    """
    if not fast:
        snap = build_drift_report(ref_frame, cur_frame, embeddings=False, drift_share=drift_share)
        return dataset_drift(snap)
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    if list(ref_frame.columns) != list(cur_frame.columns):
        raise ValueError("reference and current frames must have the same columns")
    num, cat, _ = split_columns(ref_frame)
    per_column: dict[str, Any] = {}
    for col in num + cat:
        kind = ColumnType.Numerical if col in num else ColumnType.Categorical
        r = ref_frame[col].replace([-np.inf, np.inf], np.nan).dropna()
        c = cur_frame[col].replace([-np.inf, np.inf], np.nan).dropna()
        test = get_stattest(r, c, kind, None)
        res = test(r, c, kind, None)
        per_column[col] = {"method": test.display_name, "value": float(res.drift_score),
                           "threshold": float(res.actual_threshold), "drifted": bool(res.drifted)}
    n = sum(v["drifted"] for v in per_column.values())
    share = n / len(per_column)
    return {"per_column": per_column, "n_drifted": n, "share": share, "drift_share": drift_share,
            "is_drift": bool(share >= drift_share)}


def evidently_embeddings_decision(
    z_ref: np.ndarray, z_cur: np.ndarray, method: str = "default"
) -> dict[str, Any]:
    """Evidently's embeddings-drift method on raw features: {score, is_drift, method}.

    ``method="default"`` is what ``EmbeddingsDrift`` uses when given none: a domain classifier
    (SGD logistic regression) whose ROC AUC is compared with 0.55, or, for references under 1000
    rows, with the 95th percentile of AUCs of random guesses. "mmd", "distance", "ratio" and
    "model" are Evidently's other methods with their default settings.
    """
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as edm

    ref = pd.DataFrame(np.asarray(z_ref, dtype=np.float64))
    cur = pd.DataFrame(np.asarray(z_cur, dtype=np.float64))
    makers = {
        "default": lambda: edm.model(bootstrap=len(ref) < 1000),
        "model": edm.model,
        "mmd": edm.mmd,
        "distance": edm.distance,
        "ratio": edm.ratio,
    }
    if method not in makers:
        raise ValueError(f"unknown method {method!r}; one of {sorted(makers)}")
    score, drifted, name = makers[method]()(cur, ref)
    return {"score": float(score), "is_drift": bool(drifted), "method": str(name)}


__all__ = ["evidently_decision", "evidently_embeddings_decision"]

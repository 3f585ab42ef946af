"""Label-free accuracy estimates: how well does the model work on a site's images now?

One protocol for every estimator (registered in ``models.catalog.ESTIMATORS``):

    est = load("estimator", "meta-gbm")().fit(meta)   # meta: models.estimate.bank.MetaBank
    e = est.estimate(Batch(z, probs, stats))           # -> Estimate (fixed record)
    state = est.state()                                # plain arrays, saved with the model
    est = estimator_from_state(state)                  # back, at check time (no pickle)

Every estimator predicts the DROP D = acc_ref - acc_site (acc_ref: accuracy of the clean
labelled held-out set) and reports accuracy = acc_ref - D. Its drop interval is split-conformal:
residuals of cross-fitted (grouped by bank entry) predictions on the meta-sets, either per
(site size, predicted drop) bin ("bins", Mondrian) or among the K_LOCAL nearest meta-sets in
descriptor space ("knn"). The accuracy interval adds the held-out set's own binomial error.
``verifiable`` is false (and the decision ``unknown``) when the site is unlike anything the
estimator was fitted on (``models.estimate.novelty``).

Baselines (no regression; published point estimates, intervals calibrated the same way):
no change, average confidence, DoC, ATC with max-confidence / negative-entropy scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np

from models.estimate.bank import MetaBank
from models.estimate.describe import (
    NBUCKETS,
    Batch,
    RefView,
    describe,
    group_names,
    n_bucket,
    sqdist,
)

Z90 = 1.6448536269514722  # two-sided 90%
PRED_BINS = (0.01, 0.03, 0.06, 0.10, 0.16)  # predicted-drop bin edges of the Mondrian intervals
MIN_BIN = 60  # a bin with fewer meta-sets borrows from its neighbours
K_LOCAL = 150  # meta-sets whose residuals make a "knn" interval
LOCAL_GROUPS = "qOF"  # descriptor space of the knn interval (and the novelty check)
INTERVALS = ("bins", "knn")
IMPACTS = ("harmful", "harmless", "unknown")


@dataclass(frozen=True)
class Estimate:
    """The fixed record of one estimate (accuracies and drops as fractions). A check with no
    estimate (:func:`unavailable`) has ``None`` numbers, ``verifiable`` False and the reason.
    ``ms``: how long the estimate took, when the check timed it."""

    accuracy: float | None
    low: float | None
    high: float | None
    source_accuracy: float | None
    drop: float | None
    drop_low: float | None
    drop_high: float | None
    method: str | None
    verifiable: bool
    reason: str
    n: int
    ms: float | None = None
    # the site twin's fit (``twin`` estimator): camera parameters, the condition in words,
    # residual, seconds; None for the other estimators
    twin: dict[str, Any] | None = None

    @property
    def available(self) -> bool:
        return self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (checks, the CLI, the database): ``ms`` only when timed, ``twin``
        only from the twin estimator."""
        out = asdict(self)
        for k in ("ms", "twin"):
            if out[k] is None:
                del out[k]
        return out

    to_json = to_dict

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Estimate:
        """The record of a stored JSON form (unknown keys ignored, missing ones None)."""
        return cls(**{f: d.get(f) for f in cls.__dataclass_fields__
                      if f not in ("verifiable", "reason", "n")},
                   verifiable=bool(d.get("verifiable")), reason=str(d.get("reason") or ""),
                   n=int(d.get("n") or 0))

    def with_ms(self, ms: float) -> Estimate:
        return replace(self, ms=ms)


def unavailable(reason: str, n: int = 0) -> Estimate:
    """The ``estimate`` of a check that has none (old profile, no estimator fitted)."""
    return Estimate(accuracy=None, low=None, high=None, source_accuracy=None, drop=None,
                    drop_low=None, drop_high=None, method=None, verifiable=False,
                    reason=reason, n=n)


def as_estimate(x: Estimate | Mapping[str, Any] | None, missing: str = "not computed"
                ) -> Estimate:
    """``x`` as the record: a stored JSON form is read back, None is :func:`unavailable`."""
    if isinstance(x, Estimate):
        return x
    return unavailable(missing) if not x else Estimate.from_json(x)


def impact(estimate: Estimate | Mapping[str, Any], max_drop: float) -> str:
    """harmful: the drop's lower bound is above ``max_drop``; harmless: its upper bound is
    within it; unknown: neither, not verifiable, or no estimate. (A stored JSON form works too.)"""
    e = as_estimate(estimate)
    if not e.verifiable or e.drop_low is None:
        return "unknown"
    if e.drop_low > max_drop:
        return "harmful"
    if e.drop_high is not None and e.drop_high <= max_drop:
        return "harmless"
    return "unknown"


def robust_scale(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.median(X, 0)
    iqr = np.subtract(*np.quantile(X, [0.75, 0.25], axis=0))
    return mu, np.where(iqr > 1e-9, iqr / 1.349, np.maximum(X.std(0), 1e-6))


class Estimator:
    """Base: fit(meta) -> point model + conformal intervals; estimate(batch) -> Estimate.

    Subclasses implement ``_point(X (m, d)) -> (m,)`` drop predictions (and ``_fit_point`` /
    ``_point_state`` / ``_load_point`` when they learn something)."""

    name: ClassVar[str] = "base"
    trainable: ClassVar[bool] = False  # False: described against the whole held-out set
    uses_novelty: ClassVar[bool] = False

    def __init__(self, interval: str = "knn") -> None:
        if interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
        self.interval = interval

    # --- fitting ----------------------------------------------------------------------------
    def fit(self, meta: MetaBank, folds: int = 5, seed: int = 0) -> Estimator:
        self.names = list(meta.names)
        self.refs = list(meta.refs)
        self.full = meta.full
        self.acc_ref, self.n_ref = float(meta.acc_ref), int(meta.n_ref)
        X = meta.X
        self._fit_point(X, meta.D)
        res = meta.D - self._oof(X, meta, folds, seed)
        self.oof_mae = float(np.abs(res).mean())
        b = np.array([n_bucket(int(n)) for n in meta.n])
        self._fit_bins(self._oof_cache, res, b)
        self._fit_local(meta, res, b)
        if self.uses_novelty:
            from models.estimate.novelty import Novelty

            self.novelty: Any = Novelty().fit(meta)
        return self

    def _fit_point(self, X: np.ndarray, D: np.ndarray) -> None:
        pass

    def _point(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _oof(self, X: np.ndarray, meta: MetaBank, folds: int, seed: int) -> np.ndarray:
        if not self.trainable:
            self._oof_cache = self._point(X)
            return self._oof_cache
        rng = np.random.default_rng(seed)
        specs = np.unique(meta.spec)
        fold_of = dict(zip(specs.tolist(), (rng.permutation(len(specs)) % folds).tolist(),
                           strict=True))
        f = np.array([fold_of[s] for s in meta.spec.tolist()])
        oof = np.empty(len(meta.D))
        for i in range(folds):
            tr, te = f != i, f == i
            if not te.any():
                continue
            other = type(self)(**self._kwargs())
            other.names = self.names
            other._fit_point(X[tr], meta.D[tr])
            oof[te] = other._point(X[te])
        self._oof_cache = oof
        return oof

    def _kwargs(self) -> dict[str, Any]:
        return {"interval": self.interval}

    def _fit_bins(self, oof: np.ndarray, res: np.ndarray, b: np.ndarray) -> None:
        pb = np.searchsorted(PRED_BINS, oof)
        nb_max, pk_max = len(NBUCKETS), len(PRED_BINS)
        self.qbin = np.zeros((nb_max + 1, pk_max + 1, 2))
        for nb in range(nb_max + 1):
            for k in range(pk_max + 1):
                lo, hi = k, k
                sel = (b == nb) & (pb >= lo) & (pb <= hi)
                while sel.sum() < MIN_BIN and (lo > 0 or hi < pk_max):
                    lo, hi = max(0, lo - 1), min(pk_max, hi + 1)
                    sel = (b == nb) & (pb >= lo) & (pb <= hi)
                r = res[sel] if sel.sum() >= 10 else res
                self.qbin[nb, k] = np.quantile(r, [0.05, 0.95])

    def _fit_local(self, meta: MetaBank, res: np.ndarray, b: np.ndarray) -> None:
        self.loc_cols = meta.cols(group_names(meta.names, LOCAL_GROUPS))
        Xc = meta.X[:, self.loc_cols]
        self.loc_mu, self.loc_sd = robust_scale(Xc)
        self.loc_Z = np.clip((Xc - self.loc_mu) / self.loc_sd, -1e3, 1e3).astype(np.float32)
        self.loc_res, self.loc_b = res.astype(np.float64), b.astype(np.int64)

    # --- intervals --------------------------------------------------------------------------
    def drop_interval(self, X: np.ndarray, d: float, n: int, kind: str | None = None
                      ) -> tuple[float, float]:
        kind = kind or self.interval
        if kind == "bins":
            lo, hi = self.qbin[n_bucket(n), int(np.searchsorted(PRED_BINS, d))]
            return d + float(lo), d + float(hi)
        sel = np.flatnonzero(self.loc_b == n_bucket(n))
        if len(sel) < K_LOCAL:
            sel = np.arange(len(self.loc_b))
        z = np.clip((X[:, self.loc_cols] - self.loc_mu) / self.loc_sd, -1e3, 1e3).mean(
            0, keepdims=True)
        dist = sqdist(z, self.loc_Z[sel].astype(np.float64))[0]
        near = sel[np.argsort(dist)[:K_LOCAL]]
        r = self.loc_res[near]
        return d + float(np.quantile(r, 0.05)), d + float(np.quantile(r, 0.95))

    # --- estimating -------------------------------------------------------------------------
    def describe(self, batch: Batch) -> np.ndarray:
        """(2, d) against the two half references, or (1, d) against the whole set."""
        refs = self.refs if self.trainable else [self.full]
        rows = [describe(r, batch) for r in refs]
        return np.array([[row[nm] for nm in self.names] for row in rows])

    def estimate(self, batch: Batch) -> Estimate:
        n = len(batch)
        if n < 2:
            raise ValueError(f"an estimate needs at least 2 images, got {n}")
        X = self.describe(batch)
        d = float(self._point(X).mean())
        d_lo, d_hi = self.drop_interval(X, d, n)
        acc = self.acc_ref - d
        lvl = Z90 * math.sqrt(self.acc_ref * (1 - self.acc_ref) / self.n_ref)
        low = acc - math.hypot(d_hi - d, lvl)
        high = acc + math.hypot(d - d_lo, lvl)
        verifiable, reason = True, ""
        if self.uses_novelty:
            verifiable, reason = self.novelty.check(X, n)
        return Estimate(accuracy=float(np.clip(acc, 0, 1)), low=float(np.clip(low, 0, 1)),
                        high=float(np.clip(high, 0, 1)), source_accuracy=self.acc_ref,
                        drop=d, drop_low=d_lo, drop_high=d_hi, method=self.name,
                        verifiable=verifiable, reason=reason, n=n)

    # --- plain arrays -------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            "meta": np.asarray(json.dumps({"kind": self.name, "kwargs": self._kwargs(),
                                           "names": self.names, "acc_ref": self.acc_ref,
                                           "n_ref": self.n_ref, "oof_mae": self.oof_mae})),
            "qbin": self.qbin, "loc_cols": self.loc_cols, "loc_mu": self.loc_mu,
            "loc_sd": self.loc_sd, "loc_Z": self.loc_Z, "loc_res": self.loc_res,
            "loc_b": self.loc_b,
        }
        for prefix, ref in (("ref0.", self.refs[0]), ("ref1.", self.refs[1]), ("full.", self.full)):
            out.update({prefix + k: v for k, v in ref.state().items()})
        if self.uses_novelty:
            out.update({"nov." + k: v for k, v in self.novelty.state().items()})
        out.update({"point." + k: v for k, v in self._point_state().items()})
        return out

    def _point_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_point(self, s: Mapping[str, np.ndarray]) -> None:
        pass

    @classmethod
    def _from_state(cls, s: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Estimator:
        e = cls(**meta["kwargs"])
        e.names, e.acc_ref, e.n_ref = list(meta["names"]), float(meta["acc_ref"]), int(meta["n_ref"])
        e.oof_mae = float(meta["oof_mae"])
        e.refs = [RefView.from_state(_sub(s, "ref0.")), RefView.from_state(_sub(s, "ref1."))]
        e.full = RefView.from_state(_sub(s, "full."))
        e.qbin = np.asarray(s["qbin"])
        e.loc_cols, e.loc_mu, e.loc_sd = (np.asarray(s[k]) for k in ("loc_cols", "loc_mu", "loc_sd"))
        e.loc_Z, e.loc_res, e.loc_b = (np.asarray(s[k]) for k in ("loc_Z", "loc_res", "loc_b"))
        if cls.uses_novelty:
            from models.estimate.novelty import Novelty

            e.novelty = Novelty.from_state(_sub(s, "nov."))
        e._load_point(_sub(s, "point."))
        return e


def _sub(s: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}


def estimator_from_state(state: Mapping[str, np.ndarray]) -> Estimator:
    """The estimator saved by :meth:`Estimator.state` (its class from the catalog)."""
    from models.catalog import load

    meta = json.loads(str(np.asarray(state["meta"])))
    return load("estimator", meta["kind"])._from_state(state, meta)


# --- baselines: fixed functions of the descriptors ----------------------------------------------
class NoChange(Estimator):
    name = "no-change"

    def _point(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X))


class AvgConf(Estimator):
    name = "avg-conf"

    def _point(self, X: np.ndarray) -> np.ndarray:
        return self.acc_ref - X[:, self.names.index("o_conf")]


class DoC(Estimator):
    name = "doc"

    def _point(self, X: np.ndarray) -> np.ndarray:
        return -X[:, self.names.index("o_dconf")]


class ATCMaxConf(Estimator):
    name = "atc-mc"

    def _point(self, X: np.ndarray) -> np.ndarray:
        return -X[:, self.names.index("o_atc_mc")]


class ATCNegEntropy(Estimator):
    name = "atc-ne"

    def _point(self, X: np.ndarray) -> np.ndarray:
        return -X[:, self.names.index("o_atc_ne")]


__all__ = ["as_estimate", "IMPACTS", "INTERVALS", "ATCMaxConf", "ATCNegEntropy", "AvgConf", "DoC", "Estimate",
           "Estimator", "NoChange", "estimator_from_state", "impact", "robust_scale", "unavailable"]

"""Deep Embedded Validation (DEV, You et al., ICML 2019): the site risk of a model estimated
from labelled SOURCE validation samples, importance-weighted by density ratios
w = p_site(z)/p_source(z) that a source-vs-site domain classifier gives on the bottleneck
features z, with a control variate to cut the variance.

When the weights collapse (tiny effective sample size) or the classifier separates the domains
almost perfectly, the ratios carry no information and the estimate is flagged ``unverifiable``
(e.g. faces vs landscapes: a change of concept that no re-weighting of source samples can
describe).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DEVConfig:
    # Out-of-fold domain-classifier predictions (k-fold over source-val + site): every source
    # validation sample gets a weight from a classifier that never saw it, and the AUC is
    # honest, without giving up half of a small validation set.
    folds: int = 5
    # Inverse L2 strength of the logistic domain classifier on standardised features. Strong-ish
    # regularisation: with 256-d features and a few hundred points an unregularised classifier
    # separates anything, and its ratios explode.
    C: float = 0.01
    # Effective sample size (sum w)^2 / sum w^2 below this share of the source validation set:
    # the weighted estimate rests on a handful of points.
    min_ess_fraction: float = 0.05
    # ... or below this absolute count.
    min_ess: float = 10.0
    # Out-of-fold AUC of the domain classifier above this: the domains barely overlap, density
    # ratios are ~0 or ~inf and no re-weighting of source samples describes the site.
    max_auc: float = 0.99
    seed: int = 0

    def validate(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not 0.0 <= self.min_ess_fraction <= 1.0:
            raise ValueError(f"min_ess_fraction must be in [0, 1], got {self.min_ess_fraction}")
        if not 0.5 <= self.max_auc <= 1.0:
            raise ValueError(f"max_auc must be in [0.5, 1], got {self.max_auc}")


@dataclass
class DEVResult:
    risk: float  # control-variate DEV estimate of the site risk (same unit as the losses)
    weighted_risk: float  # plain importance-weighted mean(w * L) (no control variate)
    source_risk: float  # unweighted mean(L) on source validation
    eta: float  # control-variate coefficient -Cov(wL, w) / Var(w)
    ess: float  # (sum w)^2 / sum w^2
    ess_fraction: float  # ess / n_source
    mean_weight: float  # ~1 when the ratio model is calibrated
    max_weight_share: float  # max w / sum w: one sample dominating means collapse
    domain_auc: float  # out-of-fold AUC of source-vs-site classifier (0.5 = same law)
    n_source: int
    n_target: int
    unverifiable: bool
    reason: str  # why unverifiable ("" otherwise)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dev_risk(losses: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """DEV estimator with control variate: returns (risk, weighted_risk, eta).

    With weighted losses wL_i = w_i L_i and E_source[w] = 1 known, the control variate
    eta = -Cov(wL, w) / Var(w) gives risk = mean(wL) + eta * mean(w) - eta: unbiased like
    mean(wL) (asymptotically, eta is estimated) and never of higher variance.
    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if losses.shape != w.shape or losses.size == 0:
        raise ValueError(f"losses {losses.shape} and weights {w.shape} must be equal, non-empty")
    if not (np.isfinite(losses).all() and np.isfinite(w).all()) or (w < 0).any():
        raise ValueError("losses and weights must be finite, weights >= 0")
    wl = w * losses
    var_w = w.var(ddof=1) if w.size > 1 else 0.0
    eta = 0.0 if var_w <= 1e-18 else -float(np.cov(wl, w, ddof=1)[0, 1] / var_w)
    risk = float(wl.mean() + eta * w.mean() - eta)
    return risk, float(wl.mean()), eta


def effective_sample_size(weights: np.ndarray) -> float:
    w = np.asarray(weights, dtype=np.float64)
    s2 = float((w * w).sum())
    return 0.0 if s2 <= 0 else float(w.sum() ** 2 / s2)


def density_ratios(z_source: np.ndarray, z_target: np.ndarray,
                   config: DEVConfig | None = None) -> tuple[np.ndarray, float]:
    """Out-of-fold density ratios w = p_t(z)/p_s(z) on the source points, and the domain AUC.

    A logistic regression separates source (0) from target (1) on standardised features
    (k-fold over both sets); w = p(1|z)/p(0|z) * n_s/n_t (the priors of the fold's fit).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = config or DEVConfig()
    cfg.validate()
    zs = _as_2d(z_source, "z_source")
    zt = _as_2d(z_target, "z_target")
    if zs.shape[1] != zt.shape[1]:
        raise ValueError(f"source features have {zs.shape[1]} dims, target {zt.shape[1]}")
    folds = min(cfg.folds, len(zs), len(zt))
    if folds < 2:
        raise ValueError(f"need >= 2 source and >= 2 target points, got {len(zs)} and {len(zt)}")
    x = np.concatenate([zs, zt])
    y = np.r_[np.zeros(len(zs)), np.ones(len(zt))]
    p1 = np.empty(len(x))
    w = np.empty(len(x))
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    for tr, te in skf.split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=2000))
        clf.fit(x[tr], y[tr])
        # log-odds, clipped so that exp() stays finite on perfectly separable data
        logit = np.clip(clf.decision_function(x[te]), -50.0, 50.0)
        prior = float((y[tr] == 0).sum() / max((y[tr] == 1).sum(), 1))
        p1[te] = 1.0 / (1.0 + np.exp(-logit))
        w[te] = np.exp(logit) * prior
    auc = float(roc_auc_score(y, p1))
    return w[: len(zs)], auc


def deep_embedded_validation(z_source_val: np.ndarray, losses_source_val: np.ndarray,
                             z_target: np.ndarray, config: DEVConfig | None = None) -> DEVResult:
    """DEV estimate of the target risk from labelled source-validation samples.

    z_source_val (n,D) / losses_source_val (n,): features and per-sample losses of the
    model on held-out labelled SOURCE validation data; z_target (m,D): the model's features of
    the (unlabelled) site images.
    """
    cfg = config or DEVConfig()
    losses = np.asarray(losses_source_val, dtype=np.float64).reshape(-1)
    zs = _as_2d(z_source_val, "z_source_val")
    if len(losses) != len(zs):
        raise ValueError(f"{len(zs)} source features but {len(losses)} losses")
    w, auc = density_ratios(zs, z_target, cfg)
    risk, wrisk, eta = dev_risk(losses, w)
    ess = effective_sample_size(w)
    n = len(zs)
    reasons = []
    if auc > cfg.max_auc:
        reasons.append(f"domain classifier separates source and site (AUC {auc:.3f} > {cfg.max_auc})")
    if ess < max(cfg.min_ess_fraction * n, cfg.min_ess):
        reasons.append(f"importance weights collapsed (ESS {ess:.1f} of {n})")
    if not math.isfinite(risk):
        reasons.append("non-finite risk estimate")
    return DEVResult(
        risk=risk, weighted_risk=wrisk, source_risk=float(losses.mean()), eta=eta, ess=ess,
        ess_fraction=ess / n, mean_weight=float(w.mean()),
        max_weight_share=float(w.max() / w.sum()) if w.sum() > 0 else 1.0,
        domain_auc=auc, n_source=n, n_target=int(len(z_target)),
        unverifiable=bool(reasons), reason="; ".join(reasons),
    )


def _as_2d(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{what} must be (N, D) with N >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or inf")
    return a


def per_sample_ce(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,K) probabilities, (N,) labels -> (N,) cross-entropy in nats."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))


__all__ = ["DEVConfig", "DEVResult", "deep_embedded_validation", "density_ratios", "dev_risk",
           "effective_sample_size", "per_sample_ce"]

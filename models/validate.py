"""Label-free validation of an adapted model (a "candidate") before it may replace the champion.

Site images have no labels, so nothing here measures site accuracy. What we can check:

* Deep Embedded Validation (DEV, You et al., ICML 2019): estimate the site risk from labelled
  SOURCE validation samples, importance-weighted by density ratios w = p_site(z)/p_source(z)
  that a source-vs-site domain classifier gives on the bottleneck features z, with a control
  variate to cut the variance. When the weights collapse (tiny effective sample size) or the
  classifier separates the domains almost perfectly, the ratios carry no information and the
  estimate is flagged ``unverifiable`` (e.g. faces vs landscapes: a change of concept that no
  re-weighting of source samples can describe).
* Gates: source accuracy kept, DEV risk not worse than the champion's, residual drift reduced,
  site predictions not collapsed. Each returns ``{"passed", "value", "threshold"}``.
* ``verdict``: "fail" if any gate failed, else "unverifiable" if DEV says so, else "pass".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from models.adapt import as_cached_set, cached_outputs, mk_mmd2
from models.network import EmotionNet

Gate = dict[str, Any]  # {"passed": bool, "value": float, "threshold": float}


# --- Deep Embedded Validation --------------------------------------------------------------------
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


# --- gates ----------------------------------------------------------------------------------------
def _gate(passed: bool, value: float, threshold: float) -> Gate:
    return {"passed": bool(passed), "value": float(value), "threshold": float(threshold)}


def gate_source_accuracy(candidate_acc: float, reference_acc: float, max_drop: float = 0.03) -> Gate:
    """Source validation accuracy may drop at most ``max_drop`` (0.03 = 3 points) below the
    reference (the champion's). value = drop (positive = worse)."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    drop = float(reference_acc) - float(candidate_acc)
    return _gate(drop <= max_drop + 1e-12, drop, max_drop)


def gate_dev_risk(candidate_risk: float | DEVResult, champion_risk: float | DEVResult,
                  tolerance: float = 0.05) -> Gate:
    """DEV risk (nats of cross-entropy) may exceed the champion's by at most ``tolerance``.
    value = candidate - champion. A non-finite risk fails."""
    c = candidate_risk.risk if isinstance(candidate_risk, DEVResult) else float(candidate_risk)
    r = champion_risk.risk if isinstance(champion_risk, DEVResult) else float(champion_risk)
    diff = c - r
    return _gate(math.isfinite(diff) and diff <= tolerance, diff if math.isfinite(diff) else math.inf,
                 tolerance)


def gate_residual_drift(mmd2_before: float, mmd2_after: float, max_ratio: float = 1.0,
                        floor: float = 1e-4) -> Gate:
    """Site-vs-source MMD^2 of bottleneck features after adaptation may be at most
    ``max_ratio`` times the champion's (before). value = after, threshold = max_ratio *
    max(before, floor); ``floor`` keeps a site with no drift from failing on noise."""
    thr = max_ratio * max(float(mmd2_before), floor)
    return _gate(float(mmd2_after) <= thr, mmd2_after, thr)


def gate_prediction_sanity(site_probs: np.ndarray, min_ratio: float = 0.5) -> Gate:
    """Entropy of the mean site prediction / log K must be >= ``min_ratio``: catches a model
    that collapsed onto one or two classes. 0.5 for K=6 fails e.g. 80% of the site on one
    class (ratio 0.46) but allows a moderately imbalanced site."""
    p = np.asarray(site_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"site_probs must be (N, K) with N >= 1 and K >= 2, got {p.shape}")
    m = p.mean(0)
    ratio = float(-(m * np.log(np.clip(m, 1e-12, None))).sum() / math.log(p.shape[1]))
    return _gate(ratio >= min_ratio, ratio, min_ratio)


def verdict(gates: Mapping[str, Gate] | Iterable[Gate], dev: DEVResult | bool | None) -> str:
    """"fail" if any gate failed; else "unverifiable" if DEV flagged it; else "pass"."""
    gs = list(gates.values()) if isinstance(gates, Mapping) else list(gates)
    if any(not g["passed"] for g in gs):
        return "fail"
    unver = dev.unverifiable if isinstance(dev, DEVResult) else bool(dev)
    return "unverifiable" if unver else "pass"


# --- everything at once, from cached activations ---------------------------------------------------
@dataclass
class ValidationConfig:
    max_source_drop: float = 0.03  # 3 points of source validation accuracy (issue target)
    # DEV risks are CE in nats; the paired estimates (same source samples) of champion and
    # candidate differ by noise of a few hundredths on ~200 validation images.
    dev_tolerance: float = 0.05
    drift_max_ratio: float = 1.0  # adaptation must not increase site-vs-source MMD^2
    min_entropy_ratio: float = 0.5
    # Per-sample loss DEV weights: "ce" (cross-entropy, nats; smooth, what training
    # minimises) or "error" (0-1 loss: the DEV risk is then an estimated site error rate and
    # dev_tolerance is in accuracy units).
    dev_loss: Literal["ce", "error"] = "ce"
    # Whose features decide "unverifiable": "candidate" (DEV as published: the candidate's own
    # bottleneck) or "either" (also the champion's). Alignment can make site and source
    # features of the CANDIDATE overlap although the images are of different kinds (faces
    # vs photos); the champion's features were never trained to hide the difference.
    unverifiable_from: Literal["candidate", "either"] = "either"
    dev: DEVConfig = dataclasses.field(default_factory=DEVConfig)


@dataclass
class ValidationReport:
    verdict: str  # "pass" | "fail" | "unverifiable"
    gates: dict[str, Gate]
    # DEV risks are in ``dev_loss`` units (nats of CE, or error rate)
    dev: DEVResult  # candidate
    champion_dev: DEVResult
    source_acc: float  # candidate on source validation
    champion_source_acc: float
    mmd2_before: float  # champion features, site vs source validation
    mmd2_after: float  # candidate features

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


def _model_view(model: EmotionNet, h_src: torch.Tensor, y_src: np.ndarray, h_tgt: torch.Tensor,
                loss: str):
    zs, ps = cached_outputs(model, h_src)
    zt, pt = cached_outputs(model, h_tgt)
    hit = ps.argmax(1) == y_src
    losses = per_sample_ce(ps, y_src) if loss == "ce" else (~hit).astype(np.float64)
    return zs, losses, zt, pt, float(hit.mean())


def validate_candidate(candidate: EmotionNet, champion: EmotionNet, source_val: Any,
                       site: Any, config: ValidationConfig | None = None,
                       site_candidate: Any = None, source_candidate: Any = None) -> ValidationReport:
    """Run DEV for both models and all four gates.

    source_val: labelled source validation activations ``(h, labels)`` or CachedSet (never
    used for adaptation); site: cached site activations (those adapted on are fine: nothing
    here uses site labels). site / source_val are the champion's activations; when the
    candidate's frozen part differs (adabn scope="all") pass its own activations of the same
    images as ``site_candidate`` and ``source_candidate`` (labels as in ``source_val``):
    the candidate is judged as it would run, never on the champion's activations.
    """
    cfg = config or ValidationConfig()
    if cfg.dev_loss not in ("ce", "error"):
        raise ValueError(f"dev_loss must be 'ce' or 'error', got {cfg.dev_loss!r}")
    if cfg.unverifiable_from not in ("candidate", "either"):
        raise ValueError(f"unverifiable_from must be 'candidate' or 'either', got {cfg.unverifiable_from!r}")
    src = as_cached_set(source_val, "source_val", need_labels=True)
    tgt = as_cached_set(site, "site")
    tgt_c = as_cached_set(site_candidate, "site_candidate") if site_candidate is not None else tgt
    src_c = src
    if source_candidate is not None:
        src_c = as_cached_set(source_candidate, "source_candidate")
        if len(src_c) != len(src):
            raise ValueError(f"source_candidate has {len(src_c)} images, source_val {len(src)}")
    y = src.labels.numpy()
    zs0, l0, zt0, _, acc0 = _model_view(champion, src.h, y, tgt.h, cfg.dev_loss)
    zs1, l1, zt1, pt1, acc1 = _model_view(candidate, src_c.h, y, tgt_c.h, cfg.dev_loss)
    dev0 = deep_embedded_validation(zs0, l0, zt0, cfg.dev)
    dev1 = deep_embedded_validation(zs1, l1, zt1, cfg.dev)
    mmd_before = float(mk_mmd2(torch.from_numpy(zs0), torch.from_numpy(zt0)))
    mmd_after = float(mk_mmd2(torch.from_numpy(zs1), torch.from_numpy(zt1)))
    gates = {
        "source_accuracy": gate_source_accuracy(acc1, acc0, cfg.max_source_drop),
        "dev_risk": gate_dev_risk(dev1, dev0, cfg.dev_tolerance),
        "residual_drift": gate_residual_drift(mmd_before, mmd_after, cfg.drift_max_ratio),
        "prediction_sanity": gate_prediction_sanity(pt1, cfg.min_entropy_ratio),
    }
    unverifiable = dev1.unverifiable or (cfg.unverifiable_from == "either" and dev0.unverifiable)
    return ValidationReport(
        verdict=verdict(gates, unverifiable), gates=gates, dev=dev1, champion_dev=dev0,
        source_acc=acc1, champion_source_acc=acc0, mmd2_before=mmd_before, mmd2_after=mmd_after,
    )


__all__ = [
    "DEVConfig", "DEVResult", "ValidationConfig", "ValidationReport", "deep_embedded_validation",
    "density_ratios", "dev_risk", "effective_sample_size", "gate_dev_risk",
    "gate_prediction_sanity", "gate_residual_drift", "gate_source_accuracy", "per_sample_ce",
    "validate_candidate", "verdict",
]

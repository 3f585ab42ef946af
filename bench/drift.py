"""Drift-detection benchmark on real photos: false alarms, detection power, cost.

    .venv/bin/python -m bench.drift [--data-dir DIR] [--trials 50] [--null-trials 200]

Setup (printed at the top of the output):
* Emotion6 photos are split (stratified, seeded) into train 40% / reference 25% / test 35%.
  A model is trained on the train part with ``models.train.train_source`` (EfficientNet-Lite0,
  224 px). The *reference profile* is the model's features on the reference part -- images the
  model never trained on; the "reference = training images" row shows why that matters.
* Current batches are drawn from the test part: clean (no shift), with a site condition
  (models.sim.conditions) applied to the whole batch or to 30% of it, with a class-prior shift
  (70% of the batch from two classes), or CK+48 faces instead of photos.
* Methods (all at alpha=0.05): models.drift.base.CombinedDrift on (features, softmax, quality
  statistics) = MMD + BBSD + quality AD with Bonferroni x3; MMD + BBSD (Bonferroni x2, from
  the same p-values); each sub-test alone (MMD on pooled-PCA-whitened features = the default);
  MMD on raw features with the median-heuristic bandwidth and with a 3-bandwidth mixture;
  Evidently's DataDriftPreset dataset decision on the compact view (10 PCA components,
  predicted class, confidence, quality statistics; Evidently's own per-column tests, see
  bench.evidently_baseline.evidently_decision(fast=True)); Evidently's default embeddings-drift method on
  the raw features.

Features are cached under .emowatch/cache/bench/drift/ (delete it to recompute). The first run
trains the model and extracts ~5,400 images through EfficientNet-Lite0 on CPU (~45 min on 2
busy cores; ~15 min on idle ones). With cached features a full run takes ~20 min on 2 busy cores
(most of it the 200-trial null runs and Evidently); ``--quick`` takes ~4 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import REPO
from bench.drift_data import (
    ALPHA,
    EMB_SIZES,
    PRIOR_CLASSES,
    PRIOR_SHARE,
    SIZES,
    SPLIT_SEED,
    Feats,
    FeatureStore,
    concat,
    log,
)
from models.drift.base import CombinedDrift, DriftConfig
from models.drift.mmd import MMDDrift
from models.drift.univariate import BBSDDrift
from models.quality import describe_shift
from models.sim.conditions import CONDITIONS


# --- statistics helpers ------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def fmt_rate(k: int, n: int, ci: bool = False) -> str:
    if n == 0:
        return "–"
    if not ci:
        return f"{k / n:.2f}"
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


# --- methods -------------------------------------------------------------------------------------------
METHODS = ("MMD+BBSD+quality", "MMD+BBSD", "MMD (whitened)", "MMD raw median", "MMD raw 3-scale",
           "BBSD", "quality AD", "Evidently preset", "Evidently embeddings")


class Panel:
    """All methods, fitted once on a reference; ``decide(cur)`` -> {method: bool}."""

    def __init__(self, ref: Feats, classes: list[str], min_samples: int, embeddings: bool = True):
        from tasks.reports.evidently import PCAProjection, monitoring_frame

        self.ref, self.classes, self.embeddings = ref, classes, embeddings
        cfg = DriftConfig(alpha=ALPHA, min_samples=min_samples)
        self.combined = CombinedDrift(cfg, (ref.z, ref.probs, ref.q), class_names=classes)
        raw = dataclasses.replace(cfg, whiten_components=None)
        self.mmd_raw = MMDDrift(raw, ref.z)
        self.mmd_raw3 = MMDDrift(dataclasses.replace(raw, bandwidth_multipliers=(0.5, 1.0, 2.0)), ref.z)
        self.pca = PCAProjection.fit(ref.z, 10)
        self._frame = lambda f: monitoring_frame(f.z, f.probs, classes, self.pca, f.quality())
        self.ref_frame = self._frame(ref)

    def decide(self, cur: Feats, skip: Sequence[str] = ()) -> dict[str, bool]:
        from bench.evidently_baseline import evidently_decision, evidently_embeddings_decision

        r = self.combined.predict((cur.z, cur.probs, cur.q))
        p = {k: r.details[k]["p_value"] for k in ("mmd", "bbsd", "quality")}
        out = {
            "MMD+BBSD+quality": bool(r.is_drift),
            # CombinedDrift on (z, probs) computes exactly this from the same two p-values
            "MMD+BBSD": min(1.0, 2 * min(p["mmd"], p["bbsd"])) <= ALPHA,
            "MMD (whitened)": p["mmd"] <= ALPHA,
            "MMD raw median": bool(self.mmd_raw.predict(cur.z).is_drift),
            "MMD raw 3-scale": bool(self.mmd_raw3.predict(cur.z).is_drift),
            "BBSD": p["bbsd"] <= ALPHA,
            "quality AD": p["quality"] <= ALPHA,
        }
        if "Evidently preset" not in skip:
            out["Evidently preset"] = evidently_decision(self.ref_frame, self._frame(cur), fast=True)["is_drift"]
        if self.embeddings and "Evidently embeddings" not in skip:
            out["Evidently embeddings"] = evidently_embeddings_decision(self.ref.z, cur.z)["is_drift"]
        return out


@dataclass
class Scenario:
    name: str
    draw: Callable[[np.random.Generator, int], Feats | None]  # None: not enough images


def mixed(clean: Feats, shifted: Feats, frac: float) -> Callable:
    """Batches of n distinct test images, round(frac*n) of them with the condition."""
    def draw(rng: np.random.Generator, n: int) -> Feats | None:
        if n > len(clean.z):
            return None
        idx = rng.choice(len(clean.z), n, replace=False)
        k = int(round(frac * n))
        return concat([shifted.take(idx[:k]), clean.take(idx[k:])])
    return draw


def subset_draw(pool: Feats) -> Callable:
    def draw(rng: np.random.Generator, n: int) -> Feats | None:
        return None if n > len(pool.z) else pool.take(rng.choice(len(pool.z), n, replace=False))
    return draw


def prior_draw(clean: Feats, classes: list[str]) -> Callable:
    favoured = np.isin(clean.labels, [classes.index(c) for c in PRIOR_CLASSES])
    fav, other = np.flatnonzero(favoured), np.flatnonzero(~favoured)

    def draw(rng: np.random.Generator, n: int) -> Feats | None:
        k = int(round(PRIOR_SHARE * n))
        if k > len(fav) or n - k > len(other):
            return None
        idx = np.concatenate([rng.choice(fav, k, replace=False), rng.choice(other, n - k, replace=False)])
        return clean.take(idx)
    return draw


def run_cells(panel: Panel, scenarios: Sequence[Scenario], trials: int, seed: int,
              emb_trials: int) -> dict[tuple[str, int], dict[str, tuple[int, int]]]:
    """{(scenario, n): {method: (hits, trials)}}."""
    out = {}
    for si, sc in enumerate(scenarios):
        t = time.perf_counter()
        for n in SIZES:
            rng = np.random.default_rng([seed, si, n])
            counts = {m: [0, 0] for m in METHODS}
            for trial in range(trials):
                cur = sc.draw(rng, n)
                if cur is None:
                    break
                emb = trial < emb_trials and n in EMB_SIZES
                skip = () if emb else ("Evidently embeddings",)
                for m, d in panel.decide(cur, skip).items():
                    counts[m][0] += int(d)
                    counts[m][1] += 1
            out[(sc.name, n)] = {m: (h, k) for m, (h, k) in counts.items()}
        log(f"{sc.name}: {time.perf_counter() - t:.0f} s")
    return out


def run_resplit_null(pool: Feats, n_ref: int, classes: list[str], trials: int, seed: int,
                     emb_trials: int) -> dict[int, dict[str, tuple[int, int]]]:
    """No shift, a NEW random reference/current split of the held-out photos in every trial.

    This is the false-alarm rate the tests promise (averaged over references); the fixed-
    reference rows show what one site with one reference profile sees.
    """
    out = {}
    t = time.perf_counter()
    for n in SIZES:
        rng = np.random.default_rng([seed, 99, n])
        counts = {m: [0, 0] for m in METHODS}
        for trial in range(trials):
            perm = rng.permutation(len(pool.z))
            panel = Panel(pool.take(perm[:n_ref]), classes, min_samples=20,
                          embeddings=trial < emb_trials and n in EMB_SIZES)
            for m, d in panel.decide(pool.take(perm[n_ref:n_ref + n])).items():
                counts[m][0] += int(d)
                counts[m][1] += 1
        out[n] = {m: (h, k) for m, (h, k) in counts.items()}
    log(f"no shift, re-split: {time.perf_counter() - t:.0f} s")
    return out


# --- tables ----------------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy(f: Feats) -> float:
    ok = f.labels >= 0
    return float((f.probs[ok].argmax(1) == f.labels[ok]).mean())


def timing_section(store: FeatureStore, pool: Feats, classes: list[str], quick: bool) -> str:
    from bench.evidently_baseline import evidently_decision, evidently_embeddings_decision
    from tasks.reports.evidently import (
        PCAProjection,
        build_drift_report,
        monitoring_frame,
        save_report,
    )

    rng = np.random.default_rng(123)

    def sample(n: int) -> Feats:  # real features, resampled with replacement to reach n
        return pool.take(rng.choice(len(pool.z), n, replace=True))

    def clock(fn: Callable[[], object], reps: int) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    rows = []
    for n_ref, n_cur, reps in ((1000, 500, 5), (5000, 5000, 1 if quick else 3)):
        ref, cur = sample(n_ref), sample(n_cur)
        for label, cfg in (
            ("MMD whitened (default), P=500, max_ref=2000", DriftConfig()),
            ("MMD whitened, P=500, full reference", DriftConfig(max_ref=None)),
            ("MMD raw median, P=500, max_ref=2000", DriftConfig(whiten_components=None)),
        ):
            if n_ref <= 2000 and "full" in label:
                continue
            t_fit = clock(lambda cfg=cfg, ref=ref: MMDDrift(cfg, ref.z), 1)
            det = MMDDrift(cfg, ref.z)
            rows.append([label, f"{n_ref} vs {n_cur}", f"{t_fit:.2f}",
                         f"{clock(lambda det=det, cur=cur: det.predict(cur.z), reps):.3f}"])
        bb = BBSDDrift(DriftConfig(), ref.probs)
        rows.append(["BBSD", f"{n_ref} vs {n_cur}", "0.00",
                     f"{clock(lambda bb=bb, cur=cur: bb.predict(cur.probs), reps):.3f}"])
        comb = CombinedDrift(DriftConfig(), (ref.z, ref.probs, ref.q))
        rows.append(["CombinedDrift MMD+BBSD+quality", f"{n_ref} vs {n_cur}", "–",
                     f"{clock(lambda comb=comb, cur=cur: comb.predict((cur.z, cur.probs, cur.q)), reps):.3f}"])
        pca = PCAProjection.fit(ref.z, 10)
        rf = monitoring_frame(ref.z, ref.probs, classes, pca, ref.quality())
        cf = monitoring_frame(cur.z, cur.probs, classes, pca, cur.quality())
        rows.append(["Evidently preset decision (fast path: same per-column tests)",
                     f"{n_ref} vs {n_cur}", "–",
                     f"{clock(lambda rf=rf, cf=cf: evidently_decision(rf, cf, fast=True), reps):.3f}"])
        rows.append(["Evidently Report (DataDriftPreset on compact view), build",
                     f"{n_ref} vs {n_cur}", "–",
                     f"{clock(lambda rf=rf, cf=cf: build_drift_report(rf, cf), min(reps, 2)):.2f}"])
        snap = build_drift_report(rf, cf)
        tmp = store.dir / "timing"
        rows.append(["Evidently Report, save HTML + JSON", f"{n_ref} vs {n_cur}", "–",
                     f"{clock(lambda snap=snap, tmp=tmp: save_report(snap, tmp / 'r.html', tmp / 'r.json'), 1):.2f}"])
        rows.append(["Evidently embeddings method (default: domain classifier)", f"{n_ref} vs {n_cur}",
                     "–", f"{clock(lambda ref=ref, cur=cur: evidently_embeddings_decision(ref.z, cur.z), 1):.2f}"])
        if n_ref == 1000 and not quick:
            zf = monitoring_frame(ref.z, ref.probs, classes, pca, ref.quality(), include_embeddings=True)
            zc = monitoring_frame(cur.z, cur.probs, classes, pca, cur.quality(), include_embeddings=True)
            rows.append(["Evidently Report + EmbeddingsDrift metric (fits a t-SNE)", f"{n_ref} vs {n_cur}",
                         "–", f"{clock(lambda zf=zf, zc=zc: build_drift_report(zf, zc, embeddings=True), 1):.1f}"])
    return table(["check", "n_ref vs n_cur", "fit s", "check s (median)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = os.environ.get("EMOWATCH_DATA_DIR") or str(REPO.parent / "shared" / "data")
    ap.add_argument("--data-dir", type=Path, default=Path(default_data))
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench" / "drift")
    ap.add_argument("--trials", type=int, default=50, help="trials per (shift, n) cell")
    ap.add_argument("--null-trials", type=int, default=200, help="trials per n without shift")
    ap.add_argument("--emb-trials", type=int, default=10,
                    help="trials per cell for Evidently's embeddings method (slow)")
    ap.add_argument("--train-crops", type=int, default=1, help="random-crop views per training image")
    ap.add_argument("--extract-only", action="store_true", help="compute and cache features, then stop")
    ap.add_argument("--quick", action="store_true", help="fewer conditions and trials (smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if not (args.data_dir / "emotion6").is_dir():
        sys.exit(f"Emotion6 not found under {args.data_dir} (set --data-dir or EMOWATCH_DATA_DIR)")
    t_start = time.perf_counter()
    store = FeatureStore(args.data_dir, args.cache_dir, args.train_crops)
    classes = store.classes
    conds = [(c, s) for c in CONDITIONS for s in (1, 2)]
    if args.quick:
        conds = [("night", 2), ("blur", 2)]
    train_f, ref_f, test_f = store.clean("train"), store.clean("reference"), store.clean("test")
    cond_f = {cs: store.condition(*cs) for cs in conds}
    faces_f = store.faces()
    if args.extract_only:
        log("features cached")
        return

    out: list[str] = []
    out.append("## Drift detection benchmark (bench/drift.py)\n")
    info = store.train_info or json.loads((store.dir / "train.json").read_text())
    out.append(
        f"Emotion6 split (seed {SPLIT_SEED}): train {len(train_f.z)} / reference {len(ref_f.z)} / "
        f"test {len(test_f.z)} photos; CK+48 faces: {len(faces_f.z)}. Model: EfficientNet-Lite0 "
        f"224 px trained with models.train.train_source on the train part "
        f"(val accuracy {info.get('val_accuracy', float('nan')):.3f}); features = 256-D bottleneck. "
        f"alpha = {ALPHA}. Detectors use min_samples=20 here so that n=20 is tested "
        f"(the DriftConfig default, 30, would answer insufficient_data at n=20).\n"
    )
    acc_rows = [["clean", f"{accuracy(test_f):.3f}", "–"]]
    for (c, s), f in cond_f.items():
        words = "; ".join(describe_shift(test_f.quality(), f.quality()))
        acc_rows.append([f"{c} {s}", f"{accuracy(f):.3f}", words])
    acc_rows.append(["CK+48 faces", "–", "; ".join(describe_shift(test_f.quality(), faces_f.quality()))])
    out.append("### Model accuracy on the test photos under each condition (and what quality stats say)\n")
    out.append(table(["condition", "accuracy", "describe_shift (test clean -> condition)"], acc_rows))

    # --- null ---
    panel = Panel(ref_f, classes, min_samples=20)
    panel_train = Panel(train_f, classes, min_samples=20, embeddings=False)
    null_trials = 50 if args.quick else args.null_trials
    null = run_cells(panel, [Scenario("no shift", subset_draw(test_f))], null_trials, args.seed,
                     emb_trials=min(null_trials, 100))
    null_train = run_cells(panel_train, [Scenario("no shift (ref = training images)", subset_draw(test_f))],
                           min(null_trials, 100), args.seed, emb_trials=0)
    resplit = run_resplit_null(concat([ref_f, test_f]), len(ref_f.z), classes, null_trials,
                               args.seed, emb_trials=min(null_trials, 100))
    rows = []
    for m in METHODS:
        rows.append([f"{m}, new random reference each trial"]
                    + [fmt_rate(*resplit[n][m], ci=True) for n in SIZES])
    for m in METHODS:
        rows.append([f"{m}, one fixed reference"]
                    + [fmt_rate(*null[("no shift", n)][m], ci=True) for n in SIZES])
    for m in ("MMD+BBSD+quality", "MMD+BBSD", "MMD (whitened)", "MMD raw median", "BBSD",
              "Evidently preset"):
        k = ("no shift (ref = training images)", 0)
        rows.append([f"{m}, reference = the model's TRAINING images"]
                    + [fmt_rate(*null_train[(k[0], n)][m], ci=True) for n in SIZES])
    out.append(f"\n### False-alarm rate without shift ({null_trials} trials per n; "
               "rate [95% Wilson CI]. 'New random reference': reference and current batch drawn "
               f"afresh from the {len(ref_f.z) + len(test_f.z)} held-out photos each trial (the "
               "unconditional rate the tests promise). 'One fixed reference': the reference "
               f"split vs batches from the {len(test_f.z)}-photo test pool (trials share both, so "
               "they are not independent and the CI is too narrow). Evidently embeddings: "
               f"{min(null_trials, 100)} trials, n in {EMB_SIZES} only)\n")
    out.append(table(["method"] + [f"n={n}" for n in SIZES], rows))

    # --- power ---
    scenarios = []
    for (c, s), f in cond_f.items():
        scenarios.append(Scenario(f"{c} {s}, 100%", mixed(test_f, f, 1.0)))
        scenarios.append(Scenario(f"{c} {s}, 30%", mixed(test_f, f, 0.3)))
    scenarios.append(Scenario(f"class prior ({PRIOR_SHARE:.0%} {'+'.join(PRIOR_CLASSES)})",
                              prior_draw(test_f, classes)))
    scenarios.append(Scenario("CK+48 faces instead of photos", subset_draw(faces_f)))
    trials = 20 if args.quick else args.trials
    power = run_cells(panel, scenarios, trials, args.seed + 1, emb_trials=min(args.emb_trials, trials))
    out.append(f"\n### Detection rate ({trials} trials per cell; Evidently embeddings: "
               f"{min(args.emb_trials, trials)} trials per cell at n={EMB_SIZES})\n")
    for n in SIZES:
        rows = []
        for sc in scenarios:
            cell = power[(sc.name, n)]
            rows.append([sc.name] + [fmt_rate(*cell[m]) for m in METHODS])
        out.append(f"\n**n_cur = {n}** (reference: {len(ref_f.z)} photos)\n")
        out.append(table(["shift"] + list(METHODS), rows))

    # --- cost ---
    out.append("\n### Seconds per check (1 BLAS thread; 2 CPU cores shared with other jobs: "
               "pessimistic; features resampled with replacement from the real test features)\n")
    out.append(timing_section(store, concat([test_f, *cond_f.values()]), classes, args.quick))
    out.append(f"\nTotal benchmark time: {time.perf_counter() - t_start:.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    # One BLAS thread for everything (emowatch's detectors do this by default, see
    # DriftConfig.blas_threads); keeps Evidently/scikit-learn from oversubscribing busy cores too.
    with threadpool_limits(limits=1, user_api="blas"):
        main()

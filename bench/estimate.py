"""Benchmark of the label-free accuracy estimators on real labelled photos and faces.

    python -m bench.estimate                   # 3 photo seeds + faces -> photos (~45 min)
    python -m bench.estimate --seeds 0 --trials 3 --no-faces    # quicker look
    python -m bench.estimate_stable            # then: the 30-day stable-site e-mail simulation

Protocol (every step uses the product's code: models.estimate.fit, models.estimate.base*):
* Emotion6 is split once into 4 stratified folds of 330 photos. Seed s: calibration (the
  held-out labelled set the estimator is fitted on) = fold s; site pool = fold s+1 (never
  seen by the estimator); the model is trained on the two other folds (product defaults,
  bf16 inference where the CPU has it).
* Sites: the pool under each ``models.sim.conditions`` condition at severities 1 and 2, harmless
  changes (JPEG re-encode q95/q90/q75, 2x down-and-up resize, brightness x0.9), clean, and
  class-prior shifts (one class x3; Dirichlet(2)); n in {50, 100, 240} images per site, drawn
  at random, ``--trials`` per condition and n. Truth = accuracy on the whole 330-photo pool
  under the condition (with labels); true drop = pool clean accuracy - truth (paired).
* faces -> photos: a model trained on CK+48 faces, its estimator fitted on held-out faces,
  sites = Emotion6 photos: must be verifiable = false.
* Every estimator of models.catalog.ESTIMATORS is fitted on the same meta-sets.

Caches (models, banks, condition outputs) go under .emowatch/cache/bench/estimate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import E6_CLASSES, REPO, log

CACHE = REPO / ".emowatch" / "cache" / "bench" / "estimate"
SIZES = (50, 100, 240)
CONDS = [f"{c}{s}" for c in ("night", "blur", "jpeg", "colour_cast", "greyscale") for s in (1, 2)]
HARMLESS = ["jpeg_q95", "jpeg_q90", "jpeg_q75", "resize_2x", "bright_0.9"]
PRIORS = [f"prior_x3_{c}" for c in range(6)] + ["prior_dirichlet"]
TOL = 0.03


# --- data -----------------------------------------------------------------------------------------
def data_dir() -> Path:
    import os

    d = os.environ.get("EMOWATCH_DATA_DIR")
    if not d:
        raise SystemExit("set EMOWATCH_DATA_DIR to the folder with emotion6/ and ckplus48/")
    return Path(d)


def photo_folds(labels: np.ndarray, n_folds: int = 4, seed: int = 12345) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for f in range(n_folds):
            folds[f] += idx[f::n_folds].tolist()
    return [sorted(f) for f in folds]


def transform(name: str, img: np.ndarray, i: int) -> np.ndarray:
    """A benchmark site condition (never used to fit: the bank is models.sim.shifts)."""
    import io

    from PIL import Image

    from models.sim.conditions import apply_condition

    if name == "clean" or name.startswith("prior"):
        return img
    if name in CONDS:
        cond, sev = name[:-1], int(name[-1])
        return np.asarray(apply_condition(Image.fromarray(img), cond, sev,
                                          np.random.default_rng([7, i])))
    im = Image.fromarray(img)
    if name.startswith("jpeg_q"):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(name[6:]))
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"))
    if name == "resize_2x":
        w, h = im.size
        return np.asarray(im.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
                          .resize((w, h), Image.BICUBIC))
    if name == "bright_0.9":
        return np.clip(img.astype(np.float32) * 0.9, 0, 255).astype(np.uint8)
    raise ValueError(name)


# --- models, banks, outputs (cached) ----------------------------------------------------------------
PRECISION = "fp32"  # --precision: the inference precision of the benchmark's models


def train_model(name: str, records: list[Any], classes: list[str], seed: int) -> Any:
    import torch

    from emowatch.hardware import resolve_precision
    from models.data import stratified_split
    from models.network import Checkpoint, load_checkpoint, save_checkpoint
    from models.train import TrainConfig, train_source

    path = CACHE / f"{name}.pt"
    if path.exists():
        ckpt = load_checkpoint(path)
        ckpt.config["inference"] = {"precision": resolve_precision(PRECISION)}
        return ckpt
    tr, va = stratified_split(records, 0.15, seed + 7)
    t0 = time.perf_counter()
    res = train_source([records[i] for i in tr], classes, config=TrainConfig(seed=seed),
                       val=[records[i] for i in va])
    ckpt: Checkpoint = res.checkpoint
    ckpt.config["inference"] = {"precision": resolve_precision(PRECISION)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, path)
    log(f"trained {name} in {time.perf_counter() - t0:.0f} s (val acc {res.val_metrics.accuracy:.3f})")
    torch.manual_seed(0)
    return load_checkpoint(path)


def meta_for(name: str, ckpt: Any, images: list[np.ndarray], labels: np.ndarray, cfg: Any
             ) -> tuple[Any, dict[str, Any]]:
    """The MetaBank of a model's calibration images (the bank's outputs cached)."""
    from models.estimate.bank import MetaBank
    from models.estimate.describe import Batch
    from models.estimate.fit import shifted_batches
    from models.sim.shifts import bank_specs, primitives_of

    specs = bank_specs(cfg.specs_mild, cfg.specs_severe, cfg.spec_seed)
    path = CACHE / f"{name}-bank-{cfg.specs_mild}-{cfg.specs_severe}.npz"
    t0 = time.perf_counter()
    if path.exists():
        z = np.load(path)
        ref = Batch(z["ref_z"], z["ref_p"], z["ref_s"])
        bank = [Batch(z[f"z{j}"], z[f"p{j}"], z[f"s{j}"]) for j in range(len(specs))]
        bank_s = float(z["seconds"])
    else:
        ref, bank = shifted_batches(ckpt, images, specs, cfg.seed, progress=True)
        bank_s = time.perf_counter() - t0
        arrays = {"ref_z": ref.z, "ref_p": ref.probs, "ref_s": ref.stats, "seconds": bank_s}
        for j, b in enumerate(bank):
            arrays.update({f"z{j}": b.z, f"p{j}": b.probs, f"s{j}": b.stats})
        np.savez(path, **arrays)
    t1 = time.perf_counter()
    meta = MetaBank.build(ref, labels, bank, [frozenset(primitives_of(s)) for s in specs],
                          seed=cfg.seed)
    return meta, {"bank_seconds": bank_s, "meta_seconds": time.perf_counter() - t1,
                  "n_images": len(labels), "n_specs": len(specs)}


def outputs(name: str, ckpt: Any, images: list[np.ndarray], cond: str) -> Any:
    from models.estimate.describe import Batch
    from models.estimate.fit import stats_matrix
    from models.evaluate import extract_features

    path = CACHE / f"{name}-{cond}{'' if PRECISION == 'auto' else '-' + PRECISION}.npz"
    if path.exists():
        z = np.load(path)
        return Batch(z["z"], z["p"], z["s"])
    arrs = [transform(cond, a, i) for i, a in enumerate(images)]
    zz, pp = extract_features(ckpt, arrs)
    b = Batch(zz, pp, stats_matrix(arrs))
    np.savez(path, z=b.z, p=b.probs, s=b.stats)
    return b


# --- the benchmark --------------------------------------------------------------------------------
def fit_all(meta: Any, interval: str) -> dict[str, Any]:
    from models.catalog import ESTIMATORS, load

    out = {}
    for name in ESTIMATORS:
        if getattr(load("estimator", name), "needs_images", False):
            continue  # the site twin is given images, not meta-sets (bench/twin_estimate.py)
        t0 = time.perf_counter()
        out[name] = load("estimator", name)(interval=interval).fit(meta)
        out[name].fit_s = time.perf_counter() - t0
    return out


def run_sites(ests: dict[str, Any], pool: dict[str, Any], y: np.ndarray, trials: int,
              rng: np.random.Generator, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    from threadpoolctl import threadpool_limits

    from bench.estimate_twin import draw_site

    clean_right = pool["clean"].probs.argmax(1) == y
    acc_clean = float(clean_right.mean())
    for cname, full in pool.items():
        right = full.probs.argmax(1) == y
        acc_c = np.array([right[y == c].mean() for c in range(6)])
        for n in SIZES:
            for t in range(trials):
                idx, truth = draw_site(cname, y, n, rng, acc_c, float(right.mean()))
                site = full.take(idx)
                for name, e in ests.items():
                    t0 = time.perf_counter()
                    with threadpool_limits(1):
                        out = e.estimate(site)
                    rows.append({**extra, "cond": cname, "n": n, "trial": t, "est": name,
                                 "truth": truth, "true_drop": acc_clean - truth,
                                 "ms": 1000 * (time.perf_counter() - t0), **out.to_dict()})


def photo_split(seed: int) -> tuple[Any, np.ndarray, list[int], list[int], Any]:
    """(Emotion6, labels, calibration fold, site pool fold, the model trained on the rest)."""
    from models.data import read_image_folder

    e6 = read_image_folder(data_dir() / "emotion6" / "images", classes=E6_CLASSES)
    y = np.asarray(e6.labels)
    folds = photo_folds(y)
    cal, pool = folds[seed % 4], folds[(seed + 1) % 4]
    train = sorted(set(range(len(y))) - set(cal) - set(pool))
    ckpt = train_model(f"photo{seed}", [e6.records[i] for i in train], E6_CLASSES, seed)
    return e6, y, cal, pool, ckpt


def photo_seed(seed: int, trials: int, rows: list[dict[str, Any]], cfg: Any, faces: bool,
               opts: argparse.Namespace) -> None:
    from models.images import load_rgb

    e6, y, cal, pool, ckpt = photo_split(seed)
    imgs = {i: np.asarray(load_rgb(e6.records[i].path)) for i in cal + pool}
    if not opts.twin_only:  # the twin needs no shift bank (10 minutes a seed in fp32)
        meta, info = meta_for(f"photo{seed}", ckpt, [imgs[i] for i in cal], y[cal], cfg)
        t0 = time.perf_counter()
        ests = fit_all(meta, cfg.interval)
        log(f"seed {seed}: acc_ref {meta.acc_ref:.3f}, {len(meta.D)} meta-sets, bank "
            f"{info['bank_seconds']:.0f} s, fits {time.perf_counter() - t0:.0f} s")
        rows.append({"kind": "fit", "seed": seed, **info,
                     "fit_s": {k: e.fit_s for k, e in ests.items()}})
    pool_imgs = [imgs[i] for i in pool]
    batches = {c: outputs(f"photo{seed}", ckpt, pool_imgs, c)
               for c in ["clean", *CONDS, *HARMLESS]}
    batches.update({p: batches["clean"] for p in PRIORS})
    if not opts.twin_only:
        run_sites(ests, batches, y[pool], trials, np.random.default_rng(1000 + seed), rows,
                  {"kind": "site", "seed": seed, "setting": "photos"})
    if opts.twin_trials:
        conds = ["clean", *CONDS, *HARMLESS, *opts.twin_priors.split(",")]
        from bench.estimate_twin import twin_sites

        twin_sites(ckpt, [imgs[i] for i in cal], y[cal], pool_imgs, batches, y[pool],
                   [c for c in conds if c], opts.twin_trials, tuple(opts.twin_sizes),
                   np.random.default_rng(3000 + seed), rows,
                   {"kind": "site", "seed": seed, "setting": "photos"}, opts.out, transform)
    if faces:
        face_seed(seed, trials, rows, cfg, e6, imgs, opts)


def face_seed(seed: int, trials: int, rows: list[dict[str, Any]], cfg: Any, e6: Any,
              photo_imgs: dict[int, np.ndarray], opts: argparse.Namespace) -> None:
    """A face model's estimator on photos (a concept change): must say unverifiable."""
    from models.data import read_image_folder, split_records
    from models.images import load_rgb

    ck = read_image_folder(data_dir() / "ckplus48", classes=E6_CLASSES, aliases={"happy": "joy"})
    yc = np.asarray(ck.labels)
    rest, cal = split_records(ck.records, 0.25, seed)
    ckpt = train_model(f"face{seed}", [ck.records[i] for i in rest], E6_CLASSES, seed)
    cal_imgs = [np.asarray(load_rgb(ck.records[i].path)) for i in cal]
    # the face model's own held-out accuracy is the reference
    acc_ref = float((outputs(f"face{seed}-cal", ckpt, cal_imgs, "clean").probs.argmax(1)
                     == yc[cal]).mean())
    y = np.asarray(e6.labels)
    idx = sorted(photo_imgs)
    full = outputs(f"face{seed}", ckpt, [photo_imgs[i] for i in idx], "clean")
    truth = float((full.probs.argmax(1) == y[idx]).mean())
    rng = np.random.default_rng(2000 + seed)
    extra = {"kind": "site", "seed": seed, "setting": "faces->photos"}
    if not opts.twin_only:
        meta, _ = meta_for(f"face{seed}", ckpt, cal_imgs, yc[cal], cfg)
        ests = fit_all(meta, cfg.interval)
        for n in SIZES:
            for t in range(trials):
                site = full.take(rng.choice(len(idx), n, replace=False))
                for name, e in ests.items():
                    rows.append({**extra, "cond": "faces->photos", "n": n, "trial": t,
                                 "est": name, "truth": truth,
                                 "true_drop": acc_ref - truth,
                                 **e.estimate(site).to_dict()})
    if opts.twin_trials:
        from bench.estimate_twin import twin_sites

        before = len(rows)
        twin_sites(ckpt, cal_imgs, yc[cal], [photo_imgs[i] for i in idx], {"clean": full},
                   y[idx], ["clean"], opts.twin_trials, tuple(opts.twin_sizes),
                   np.random.default_rng(4000 + seed), rows, extra, opts.out, transform)
        for r in rows[before:]:
            r["cond"], r["true_drop"] = "faces->photos", acc_ref - r["truth"]


# --- tables ---------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def tables(rows: list[dict[str, Any]]) -> str:
    from models.estimate.base import impact

    sites = [r for r in rows if r.get("kind") == "site"]
    photos = [r for r in sites if r["setting"] == "photos"]
    names = list(dict.fromkeys(r["est"] for r in sites))
    main = [r for r in photos if not r["cond"].startswith("prior")]
    out = ["### Accuracy error (points) over corruptions + harmless + clean, and coverage",
           "", "| estimator | MAE n=240 | n=100 | n=50 | drop MAE n=240 | class-prior MAE n=240 "
           "| 90% interval covers truth n=240 / 100 / 50 |", "|---|---|---|---|---|---|---|"]
    for e in names:
        def sel(n: int, rs: list[dict[str, Any]] = main, e: str = e) -> list[dict[str, Any]]:
            return [r for r in rs if r["est"] == e and r["n"] == n]
        mae = [100 * _mean([abs(r["accuracy"] - r["truth"]) for r in sel(n)]) for n in SIZES[::-1]]
        dmae = 100 * _mean([abs(r["drop"] - r["true_drop"]) for r in sel(240)])
        pr = [r for r in photos if r["cond"].startswith("prior")]
        pmae = 100 * _mean([abs(r["accuracy"] - r["truth"]) for r in sel(240, pr)])
        cov = [100 * _mean([r["low"] <= r["truth"] <= r["high"] for r in sel(n)])
               for n in SIZES[::-1]]
        out.append(f"| {e} | {mae[0]:.1f} | {mae[1]:.1f} | {mae[2]:.1f} | {dmae:.1f} | "
                   f"{pmae:.1f} | {cov[0]:.0f} / {cov[1]:.0f} / {cov[2]:.0f} |")
    out += ["", "### Decisions (tolerance 3 points): % harmful / harmless / unknown by true drop",
            "", "| estimator | n | true drop <= 1 pt | 1-8 pts | > 8 pts |", "|---|---|---|---|---|"]
    for e in names:
        for n in SIZES:
            cells = []
            for lo, hi in ((-1, 0.01), (0.01, 0.08), (0.08, 1)):
                rs = [r for r in photos if r["est"] == e and r["n"] == n
                      and lo < r["true_drop"] <= hi]
                imp = [impact(r, TOL) for r in rs]
                cells.append(" / ".join(f"{100 * _mean([i == k for i in imp]):.0f}"
                                        for k in ("harmful", "harmless", "unknown"))
                             + f" (N={len(rs)})")
            out.append(f"| {e} | {n} | " + " | ".join(cells) + " |")
    default = "meta-gbm"
    for e in [x for x in ("meta-gbm", "twin") if x in names]:
        out += ["", f"### Per condition, {e}, n = 240", "",
                "| condition | trials | true drop | est. drop | MAE | drop MAE | covered | harmful "
                "| harmless | unknown | unverifiable |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in dict.fromkeys(r["cond"] for r in sites):
            rs = [r for r in sites if r["est"] == e and r["n"] == 240 and r["cond"] == c]
            if not rs:
                continue
            imp = [impact(r, TOL) for r in rs]
            out.append(
                f"| {c} | {len(rs)} | {100 * _mean([r['true_drop'] for r in rs]):.1f} | "
                f"{100 * _mean([r['drop'] for r in rs]):.1f} | "
                f"{100 * _mean([abs(r['accuracy'] - r['truth']) for r in rs]):.1f} | "
                f"{100 * _mean([abs(r['drop'] - r['true_drop']) for r in rs]):.1f} | "
                f"{100 * _mean([r['low'] <= r['truth'] <= r['high'] for r in rs]):.0f} | "
                + " | ".join(f"{100 * _mean([i == k for i in imp]):.0f}"
                             for k in ("harmful", "harmless", "unknown"))
                + f" | {100 * _mean([not r['verifiable'] for r in rs]):.0f} |")
    out += ["", "### Untouched or re-encoded photos (clean + harmless changes), n = 240: "
            "% of trials not harmless", "",
            "An e-mail (default `alert_on` harmful) needs a harmful impact, or an unknown one while "
            "the drift test fires: the share not called harmless bounds the e-mail rate from "
            "above.", "", "| estimator | trials | harmless | unknown | harmful |",
            "|---|---|---|---|---|"]
    quiet = {"clean", *HARMLESS}
    for e in names:
        rs = [r for r in photos if r["est"] == e and r["n"] == 240 and r["cond"] in quiet]
        if rs:
            imp = [impact(r, TOL) for r in rs]
            out.append(f"| {e} | {len(rs)} | " + " | ".join(
                f"{100 * _mean([i == k for i in imp]):.0f}"
                for k in ("harmless", "unknown", "harmful")) + " |")
    ms = [r["ms"] for r in sites if r["est"] == default and "ms" in r]
    fits = [r for r in rows if r.get("kind") == "fit"]
    if ms:
        out += ["", f"estimate() of {default}: median {np.median(ms):.1f} ms, max {max(ms):.1f} ms "
                f"(single-threaded BLAS)"]
    for f in fits:
        out.append(f"seed {f['seed']}: bank {f['bank_seconds']:.0f} s ({f['n_specs']} shifts x "
                   f"{f['n_images']} images), fit of {default} {f['fit_s'][default]:.0f} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from models.estimate.fit import EstimatorConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--specs", type=int, default=60, help="bank size (2/3 mild, 1/3 severe)")
    ap.add_argument("--interval", default="knn", choices=("knn", "bins"))
    ap.add_argument("--no-faces", action="store_true")
    ap.add_argument("--out", type=Path, default=CACHE / "results.json")
    ap.add_argument("--tables", type=Path, help="only print the tables of a results file")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="inference precision of the benchmark's models (default fp32)")
    ap.add_argument("--twin-trials", type=int, default=1,
                    help="trials of the twin estimator per condition and size (0: none; its "
                         "fit takes 20-130 s a site)")
    ap.add_argument("--twin-sizes", type=lambda v: [int(x) for x in v.split(",")],
                    default=[240], help="site sizes the twin is measured at (default 240)")
    ap.add_argument("--twin-priors", default="prior_x3_0,prior_dirichlet",
                    help="class-prior sites the twin is measured on (comma-separated)")
    ap.add_argument("--twin-only", action="store_true",
                    help="only the twin (append to --out when it exists)")
    args = ap.parse_args(argv)
    global PRECISION
    PRECISION = args.precision
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    cfg = EstimatorConfig(interval=args.interval, specs_mild=round(2 * args.specs / 3),
                          specs_severe=args.specs - round(2 * args.specs / 3))
    rows: list[dict[str, Any]] = []
    if args.twin_only and args.out.exists():
        rows = [r for r in json.loads(args.out.read_text()) if r.get("est") != "twin"]
    for i, s in enumerate(int(x) for x in args.seeds.split(",")):
        photo_seed(s, args.trials, rows, cfg, faces=not args.no_faces and i < 2, opts=args)
        args.out.write_text(json.dumps(rows, default=float))
    print(tables(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

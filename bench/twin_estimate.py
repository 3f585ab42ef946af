"""How close is a model's accuracy on the site twin to its accuracy on the site?

    python -m bench.twin_estimate [--seed 0] [--draws 3] [--out bench/results/twin_estimate.md]

A first measurement of the twin as an accuracy estimator, before it is wired into the checks.
The model is a stand-in: logistic regression on the frozen ImageNet EfficientNet-Lite0's
pooled features (the data README's probe), fitted on 600 Emotion6 photos. Of the other
photos, 240 are the labelled held-out set the twin transforms, 120 are the site's unlabelled
images the camera is fitted to, and 240 more, under the same condition, give the true
accuracy. Per condition (``models.sim.conditions``, which the camera model was not written
from): the truth, the product's estimate (``TwinEstimator.estimate_images``: the fit, then the
bootstrap over images and draws, widened by the fit's residual) with its 90% intervals,
"no change" (the held-out accuracy), and the condition the twin found. Writes the table as it
goes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.estimate.twin import TwinConfig, on_grid
from models.estimate.twin_estimator import TwinEstimator
from models.network import LITE_MEAN, LITE_STD, EmotionNet, NetConfig
from models.sim.conditions import apply_condition

REPO = Path(__file__).resolve().parents[1]
SITES = [("clean", None, 0), ("night", "night", 1), ("night", "night", 2), ("blur", "blur", 1),
         ("blur", "blur", 2), ("jpeg", "jpeg", 2), ("colour_cast", "colour_cast", 2),
         ("greyscale", "greyscale", 2)]


class Probe:
    """Frozen Lite0 pooled features -> standardised logistic regression."""

    def __init__(self) -> None:
        cfg = NetConfig(img_size=224, trainable_blocks=0, multilevel=False)
        self.net = EmotionNet(cfg).eval()
        self.mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(LITE_STD).view(1, 3, 1, 1)

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 32):
                x = torch.as_tensor(np.stack(on_grid(images[i:i + 32], 224))).permute(0, 3, 1, 2)
                x = (x.float() / 255 - self.mean) / self.std
                out.append(self.net.top(self.net.frozen_forward(x)).numpy())
        return np.concatenate(out)

    def fit(self, images: list[np.ndarray], y: np.ndarray) -> Probe:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        f = self.features(images)
        self.scaler = StandardScaler().fit(f)
        self.clf = LogisticRegression(C=0.1, max_iter=3000).fit(self.scaler.transform(f), y)
        return self

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        return self.clf.predict(self.scaler.transform(self.features(images)))

    def predict_with_features(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(images)
        return self.clf.predict(self.scaler.transform(f)), f


def load(files: list[Path], size: int = 224) -> list[np.ndarray]:
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    return out


@dataclass
class Split:
    """The Emotion6 photos of one seed: the probe fitted on 600, then the held-out set, the
    site's fit images and the truth images (their indices, labels and 224 px images)."""

    probe: Probe
    y: np.ndarray
    held: np.ndarray
    fit_site: np.ndarray
    truth_site: np.ndarray
    held_imgs: list[np.ndarray]
    fit_imgs: list[np.ndarray]
    truth_imgs: list[np.ndarray]
    rng: np.random.Generator  # after the shuffle: what the conditions draw from


def emotion6_split(data_dir: Path, seed: int) -> Split:
    root = data_dir / "emotion6" / "images"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = sorted(root.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    rng.shuffle(files)
    y = np.array([classes.index(f.parent.name) for f in files])
    tr, held, fit_site, truth_site = np.split(np.arange(len(files)), [600, 840, 960, 1200])[:4]
    probe = Probe().fit(load([files[i] for i in tr]), y[tr])
    return Split(probe, y, held, fit_site, truth_site, load([files[i] for i in held]),
                 load([files[i] for i in fit_site]), load([files[i] for i in truth_site]), rng)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--refine-sweeps", type=int, default=None,
                    help="TwinConfig.refine_sweeps (default: the product's; 0: statistics only)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "twin_estimate.md")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    sp = emotion6_split(args.data_dir, args.seed)
    probe, y_all, rng = sp.probe, sp.y, sp.rng
    held, fit_site, truth_site = sp.held, sp.fit_site, sp.truth_site
    held_imgs, fit_imgs, truth_imgs = sp.held_imgs, sp.fit_imgs, sp.truth_imgs
    no_change = float((probe.predict(held_imgs) == y_all[held]).mean())
    cfg = TwinConfig(seed=args.seed)
    if args.refine_sweeps is not None:
        cfg.refine_sweeps = args.refine_sweeps
    rows = [f"# The twin as an accuracy estimator (seed {args.seed}, stand-in model: Lite0 probe, "
            f"{len(held)} held-out, {len(fit_site)} site images fitted, truth on "
            f"{len(truth_site)}, {args.draws} draws; probe fitted in "
            f"{time.perf_counter() - t0:.0f} s; TwinEstimator defaults, refine_sweeps "
            f"{cfg.refine_sweeps})", "",
            "| site | true accuracy | twin estimate [90%] | covered | error (pts) | no change "
            "| error (pts) | true drop (pts) | twin drop [90%] (pts) | drop covered | held-out "
            "under the condition (pts) | condition found | residual | feature distance | "
            "verifiable | fit + estimate s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # Drops are paired: the truth's against the same truth photos clean, the twin's against
    # the held-out photos clean; two random 240-photo sets differ by ~3 points (1 s.e.).
    truth_clean = float((probe.predict(truth_imgs) == y_all[truth_site]).mean())
    print("\n".join(rows), flush=True)
    twin = TwinEstimator(cfg, draws=args.draws)
    errs: list[tuple[float, float]] = []
    for label, cond, sev in SITES:
        def under(imgs: list[np.ndarray], cond=cond, sev=sev) -> list[np.ndarray]:
            if cond is None:
                return imgs
            return [np.asarray(apply_condition(im, cond, sev, rng)) for im in imgs]

        site = under(fit_imgs)
        truth = float((probe.predict(under(truth_imgs)) == y_all[truth_site]).mean())
        t1 = time.perf_counter()
        est, fit = twin.estimate_images(probe.predict_with_features, held_imgs, y_all[held],
                                        site, seed=args.seed,
                                        site_features=probe.features(site))
        secs = time.perf_counter() - t1
        true_drop = truth_clean - truth  # positive: worse, as Estimate.drop
        # the perfect twin: the condition itself on the held-out photos (its error against
        # the truth is sampling alone: two sets of 240 photos)
        oracle = no_change - float((probe.predict(under(held_imgs)) == y_all[held]).mean())
        covered = est.low <= truth <= est.high
        d_cov = est.drop_low <= true_drop <= est.drop_high
        errs.append((abs(est.accuracy - truth), abs(est.drop - true_drop),
                     abs(oracle - true_drop), abs(est.drop - oracle)))
        name = f"{label} {sev}" if cond else label
        row = (f"| {name} | {truth:.3f} | {est.accuracy:.3f} [{est.low:.3f}, {est.high:.3f}] | "
               f"{'yes' if covered else 'NO'} | {100 * abs(est.accuracy - truth):.1f} | "
               f"{no_change:.3f} | {100 * abs(no_change - truth):.1f} | "
               f"{-100 * true_drop:+.1f} | {-100 * est.drop:+.1f} [{-100 * est.drop_high:+.1f}, "
               f"{-100 * est.drop_low:+.1f}] | {'yes' if d_cov else 'NO'} | {-100 * oracle:+.1f} | "
               f"{fit.describe()} | "
               f"{fit.distance:.2f} | {est.twin['feature_distance']:.2f} | "
               f"{'yes' if est.verifiable else 'no'} | {secs:.0f} |")
        rows.append(row)
        print(row, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    # A change of content, not of camera: CK+48 faces as the held-out set, the clean photos as
    # the site. Only verifiability is read (the probe knows photo classes, not faces').
    faces = sorted((args.data_dir / "ckplus48").rglob("*.png"))
    if faces:
        face_imgs = load(faces[:len(held)])
        t1 = time.perf_counter()
        est, fit = twin.estimate_images(probe.predict_with_features, face_imgs,
                                        np.zeros(len(face_imgs), int), fit_imgs, seed=args.seed,
                                        site_features=probe.features(fit_imgs))
        rows.append(f"| faces -> photos | - | - | - | - | - | - | - | - | - | - | {fit.describe()} | "
                    f"{fit.distance:.2f} | {est.twin['feature_distance']:.2f} | "
                    f"{'yes' if est.verifiable else 'no'} | {time.perf_counter() - t1:.0f} |")
        print(rows[-1], flush=True)
    acc_mae, drop_mae, floor, own = (100 * float(np.mean([e[i] for e in errs]))
                                     for i in range(4))
    rows += ["", f"Mean error: accuracy {acc_mae:.1f} points, paired drop {drop_mae:.1f} points "
                 f"({len(errs)} sites); the perfect twin (the condition on the held-out photos) "
                 f"{floor:.1f} points from the truth (sampling alone); the twin {own:.1f} points "
                 f"from the perfect twin."]
    print(rows[-1], flush=True)
    args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")

if __name__ == "__main__":
    main()

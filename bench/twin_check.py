"""What the site twin adds to a check, in seconds, with the product's own code path.

    python -m bench.twin_check [--n 240] [--precision fp32] [--out bench/results/twin_check.md]

``tasks.impact.twin_estimate`` (what a monitor check runs for a version without a bank
estimator) with an EfficientNet-Lite0 checkpoint at 224 px (ImageNet weights, an untrained
head: the seconds do not depend on what the head learnt), ``--n`` labelled Emotion6 photos kept
as the twin's images (as ``emowatch train`` keeps them: the original files) and ``--n`` other
photos as the site, written as JPEG files the way ingestion stores them. Per site: the first
check (the camera searched), the next check of the same camera (the camera kept: one
evaluation), and the fit's and the estimate's shares. Torch uses the machine's cores
(``torch.get_num_threads()`` is printed); run it alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import E6_CLASSES, REPO, default_data_dir
from models.network import Checkpoint, EmotionNet, NetConfig, Preprocessing
from models.profile import ReferenceProfile
from models.sim.conditions import apply_condition
from tasks.impact import twin_estimate

SITES = [("clean", None, 0), ("night 2", "night", 2), ("blur 2", "blur", 2), ("jpeg 2", "jpeg", 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "twin_check.md")
    args = ap.parse_args()
    root = args.data_dir / "emotion6" / "images"
    files = sorted(root.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    rng.shuffle(files)
    held, site_src = files[:args.n], files[args.n:2 * args.n]
    net = EmotionNet(NetConfig(img_size=224, num_classes=len(E6_CLASSES))).eval()
    ckpt = Checkpoint(net, list(E6_CLASSES), Preprocessing(img_size=224),
                      config={"inference": {"precision": args.precision}})
    prof = ReferenceProfile.from_arrays(np.zeros((2, 4)), np.full((2, 6), 1 / 6), E6_CLASSES)
    prof.set_twin_images([f.read_bytes() for f in held],
                         [E6_CLASSES.index(f.parent.name) for f in held])
    rows = [f"# The twin's cost in a check (tasks.impact.twin_estimate; Lite0 224 px, "
            f"{args.precision}, {torch.get_num_threads()} torch threads, {args.n} twin images, "
            f"{args.n} site photos)", "",
            "| site | check | condition | evaluations | fit s | estimate s | total s |",
            "|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cond, sev in SITES:
            paths = []
            for i, f in enumerate(site_src):
                with Image.open(f) as im:
                    img = im.convert("RGB")
                    if cond is not None:
                        img = apply_condition(img, cond, sev, rng)
                    p = Path(tmp) / f"{cond or 'clean'}-{i:04d}.jpg"
                    img.save(p, quality=95)
                    paths.append(str(p))
            previous = None
            for check in ("first", "next"):
                t0 = time.perf_counter()
                est = twin_estimate(prof, ckpt, paths, previous)
                total = time.perf_counter() - t0
                tw = est.twin or {}
                row = (f"| {name} | {check} | {tw.get('condition')} | {tw.get('evaluations')} | "
                       f"{tw.get('seconds', 0):.1f} | {total - tw.get('seconds', 0):.1f} | "
                       f"{total:.1f} |")
                rows.append(row)
                print(row, flush=True)
                previous = tw
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Featurization throughput on this machine, and how bf16 agrees with fp32.

    EMOWATCH_DATA_DIR=../shared/data python -m bench.throughput [--n 1000] [--threads 2]

Prints, in one run, images/second of: JPEG decode + resize (one thread, the pool), the raw
forward of EfficientNet-Lite0 at 224 px (fp32 NCHW batch 32, channels-last bf16 batch 8), and
the whole featurize path the product uses (``models.evaluate.extract_features`` on decoded
arrays, and decode + quality statistics + forward as ``tasks.featurize.compute_chunk`` does);
then, on the same photos, the agreement of the bf16 probabilities with fp32 (max and mean
absolute difference, top-1 agreement) and whether the drift decision of a benchmark-like
check (MMD+BBSD on 240 photos vs 500 reference photos, clean and night) changes.

The model: the cached bench/estimate photo model when it exists (a trained Emotion6 model),
else Lite0 with its ImageNet backbone and an untrained head (throughput is the same; the
agreement figures then describe an untrained head and are marked so).
"""

from __future__ import annotations

import argparse
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO

MODEL = REPO / ".emowatch" / "cache" / "bench" / "estimate" / "photo0.pt"


def _photos(n: int) -> list[Path]:
    import os

    d = os.environ.get("EMOWATCH_DATA_DIR")
    if not d:
        raise SystemExit("set EMOWATCH_DATA_DIR to the folder with emotion6/")
    paths = sorted(Path(d, "emotion6", "images").rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no Emotion6 photos under {d}/emotion6/images")
    return paths[:n]


def _model():
    from models.network import Checkpoint, EmotionNet, NetConfig, load_checkpoint, preprocessing_for

    if MODEL.is_file():
        return load_checkpoint(MODEL), "trained Emotion6 model (bench/estimate cache)"
    cfg = NetConfig(backbone="efficientnet-lite0", img_size=224, pretrained=True, num_classes=6)
    net = EmotionNet(cfg).eval()
    return (Checkpoint(net, [str(i) for i in range(6)], preprocessing_for(cfg), {}),
            "Lite0 ImageNet backbone, untrained head")


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="photos (agreement is measured on all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drift", action="store_true",
                    help="also the drift decisions where bf16 is emulated (many minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from models.evaluate import extract_features
    from models.images import load_rgb
    from models.quality import image_stats

    paths = _photos(args.n)
    ckpt, what = _model()
    ckpt.model.eval()
    prep = ckpt.preprocessing
    rows: list[tuple[str, str, str]] = []
    t_start = time.perf_counter()

    def note(what: str) -> None:  # progress on stderr (the tables go to stdout at the end)
        import sys

        print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", file=sys.stderr, flush=True)

    def decode(p: Path) -> np.ndarray:
        return prep.to_array(load_rgb(p))

    t = time.perf_counter()
    arrays = [decode(p) for p in paths]
    rows.append(("decode + resize, 1 thread", _rate(len(paths), time.perf_counter() - t), ""))
    t = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(decode, paths))
    rows.append((f"decode + resize, {args.threads} threads", _rate(len(paths),
                                                                 time.perf_counter() - t), ""))
    note("decoded")
    x = np.stack(arrays)
    model = ckpt.model.eval()
    sub = torch.as_tensor(prep.normalize(x[:128]))
    with torch.no_grad():
        t = time.perf_counter()
        for b in torch.split(sub, 32):
            model.forward_cached(model.frozen_forward(b))
        rows.append(("raw forward fp32 NCHW batch 32", _rate(len(sub), time.perf_counter() - t),
                     "the reference"))
        m2 = copy.deepcopy(model).to(memory_format=torch.channels_last)  # own copy: fp32 NCHW
        # runs on channels-last weights take a slow path
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for b in torch.split(sub, 8):
                m2.forward_cached(m2.frozen_forward(b.contiguous(memory_format=torch.channels_last)))
        rows.append(("raw forward bf16 channels-last batch 8",
                     _rate(len(sub), time.perf_counter() - t), ""))
    note("raw forwards done")
    t = time.perf_counter()
    z32, p32 = extract_features(ckpt, x, batch_size=32, precision="fp32")
    rows.append(("extract_features fp32 (arrays)", _rate(len(x), time.perf_counter() - t), ""))
    note("fp32 features done")
    t = time.perf_counter()
    z16, p16 = extract_features(ckpt, x, precision="bf16")
    rows.append(("extract_features bf16 (arrays)", _rate(len(x), time.perf_counter() - t),
                 "the product's default where the CPU has bf16"))
    note("bf16 features done")
    t = time.perf_counter()
    grids, stats = [], []
    for p in paths[:300]:
        img = load_rgb(p)
        grids.append(prep.to_array(img))
        stats.append(image_stats(img))
    extract_features(ckpt, np.stack(grids), precision="bf16")
    rows.append(("whole path: decode + quality stats + bf16 forward", _rate(
        300, time.perf_counter() - t), "as tasks.featurize.compute_chunk, 300 photos"))

    print(f"\n## Featurization throughput ({len(paths)} Emotion6 photos, {args.threads} threads, "
          f"{what})\n")
    print("| step | images/s | note |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1].strip()} | {r[2]} |")

    diff = np.abs(p16 - p32)
    agree = float((p16.argmax(1) == p32.argmax(1)).mean())
    print(f"\n## bf16 vs fp32 on the same {len(x)} photos ({what})\n")
    print("| max abs prob diff | mean abs prob diff | top-1 agreement | feature cosine (mean) |")
    print("|---:|---:|---:|---:|")
    cos = (z16 * z32).sum(1) / (np.linalg.norm(z16, axis=1) * np.linalg.norm(z32, axis=1) + 1e-12)
    print(f"| {diff.max():.4f} | {diff.mean():.5f} | {agree:.4f} | {cos.mean():.5f} |")
    from emowatch.hardware import native_bf16

    print(f"\nnative bf16 on this CPU: {native_bf16()} (without it bf16 is emulated and the "
          "product's 'auto' precision is fp32)")
    if native_bf16() or args.drift:
        _drift_decisions(ckpt, x, paths)
    else:
        print("(drift decisions fp32 vs bf16 skipped: bf16 is emulated here; --drift forces)")


def _drift_decisions(ckpt, x: np.ndarray, paths: list[Path]) -> None:
    """The drift decision on a reference of 500 photos vs 240 others, clean and night, in fp32
    and bf16 (both sides in the same precision, as a model version always is)."""
    from PIL import Image

    from models.conditions import apply_condition
    from models.drift import CombinedDrift, DriftConfig
    from models.evaluate import extract_features

    if len(x) < 740:
        print("\n(drift decision check skipped: needs --n >= 740)")
        return
    night = np.stack([ckpt.preprocessing.to_array(apply_condition(
        Image.fromarray(a), "night", 1, np.random.default_rng([7, i])))
        for i, a in enumerate(x[500:740])])
    print("\n## Drift decision, fp32 vs bf16 (MMD+BBSD, 500 reference vs 240 site photos)\n")
    print("| site | fp32 decision (p) | bf16 decision (p) |\n|---|---|---|")
    for name, site in (("clean", x[500:740]), ("night", night)):
        out = []
        for prec in ("fp32", "bf16"):
            zr, pr = extract_features(ckpt, x[:500], precision=prec)
            zs, ps = extract_features(ckpt, site, precision=prec)
            det = CombinedDrift(DriftConfig(alpha=0.05, min_samples=30, n_permutations=500),
                                (zr, pr), class_names=list(ckpt.classes))
            r = det.predict((zs, ps))
            out.append(f"{r.decision} ({r.p_value:.3g})")
        print(f"| {name} | {out[0]} | {out[1]} |")


if __name__ == "__main__":
    main()

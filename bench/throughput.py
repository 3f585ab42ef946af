"""Featurization throughput on this machine, and how the fast engines agree with torch fp32.

    EMOWATCH_DATA_DIR=../shared/data python -m bench.throughput [--n 1000] [--threads 2]

Prints, in one run, images/second of: JPEG decode + resize (one thread, the pool), the raw
forward of EfficientNet-Lite0 at 224 px (torch fp32 NCHW batch 32 and channels-last batch 4,
torch bf16 where the CPU has it natively, ONNX Runtime fp32 where installed), and the whole
featurize path the product uses (``models.evaluate.extract_features`` on decoded arrays, and
decode + quality statistics + forward overlapped, as ``tasks.featurize.compute_chunk`` does)
against the best raw forward; then, on the same photos, the agreement of each fast engine's
probabilities with torch fp32 (max and mean absolute difference, top-1 agreement) and whether
the drift decision of a benchmark-like check (MMD+BBSD on 240 photos vs 500 reference photos,
clean and night) changes.

The model: the cached bench/estimate photo model when it exists (a trained Emotion6 model),
else Lite0 with its ImageNet backbone and an untrained head (throughput is the same; the
agreement figures then describe an untrained head and are marked so).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
    # a fixed shuffle: the drift check's reference and site must come from the same mix of
    # classes (sorted paths are grouped by class folder)
    order = np.random.default_rng(0).permutation(len(paths))
    return [paths[i] for i in order[:n]]


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
    ap.add_argument("--n-perm", type=int, default=500, help="permutations of the drift tests")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from emowatch.hardware import native_bf16, resolve_precision
    from models import engine
    from models.evaluate import extract_features, extract_features_overlapped
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
    sub = torch.as_tensor(prep.normalize(x[:128])).contiguous()
    best = 0.0

    def raw(name: str, fn, batch: int, note_: str = "") -> None:
        nonlocal best
        fn(sub[:batch])  # warm-up (and for ONNX Runtime: the session's first run)
        t = time.perf_counter()
        for b in torch.split(sub, batch):
            fn(b)
        r = len(sub) / (time.perf_counter() - t)
        best = max(best, r)
        rows.append((name, f"{r:7.1f}", note_))

    with torch.no_grad():
        raw("raw forward torch fp32 NCHW batch 32",
            lambda b: model.forward_cached(model.frozen_forward(b)), 32, "before this round")
        m2 = copy.deepcopy(model).to(memory_format=torch.channels_last)  # own copy: fp32 NCHW
        # runs on channels-last weights take a slow path
        raw("raw forward torch fp32 channels-last batch 4", lambda b: m2.forward_cached(
            m2.frozen_forward(b.contiguous(memory_format=torch.channels_last))), 4)
        if native_bf16():
            def bf16(b):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m2.forward_cached(m2.frozen_forward(
                        b.contiguous(memory_format=torch.channels_last)))
            raw("raw forward torch bf16 channels-last batch 8", bf16, 8)
        if engine.available():
            t = time.perf_counter()
            ort_pass = engine.onnx_pass(model, "full", prep.img_size)
            export_s = time.perf_counter() - t
            for bs in (4, 8, 32):
                raw(f"raw forward ONNX Runtime fp32 batch {bs}", lambda b: ort_pass(b.numpy()), bs,
                    f"export + session {export_s:.1f} s, once per model version" if bs == 4 else "")
    note("raw forwards done")
    ref = dataclasses.replace(ckpt, engine="torch")
    t = time.perf_counter()
    z32, p32 = extract_features(ref, x, batch_size=32, precision="fp32")
    rows.append(("extract_features torch fp32 (arrays)", _rate(len(x), time.perf_counter() - t),
                 "before this round"))
    note("torch fp32 features done")
    others: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if engine.available():
        t = time.perf_counter()
        others["ONNX Runtime fp32"] = extract_features(
            dataclasses.replace(ckpt, engine="onnx"), x, precision="fp32")
        rows.append(("extract_features ONNX Runtime fp32 (arrays)",
                     _rate(len(x), time.perf_counter() - t), "the product's 'auto' without bf16"))
    if native_bf16():
        t = time.perf_counter()
        others["torch bf16"] = extract_features(ref, x, precision="bf16")
        rows.append(("extract_features torch bf16 (arrays)",
                     _rate(len(x), time.perf_counter() - t), "'auto' where the CPU has bf16"))
    note("features done")
    product = dataclasses.replace(ckpt, engine="auto")
    product.config = {**ckpt.config, "inference": {"precision": resolve_precision("auto")}}
    whole = {}
    quals: dict[int, dict] = {}

    def load(i: int) -> np.ndarray:
        img = load_rgb(paths[i])
        quals[i] = image_stats(img)
        return prep.to_array(img)

    for bs in (16, 64):

        t = time.perf_counter()
        extract_features_overlapped(product, list(range(len(paths))), load, bs)
        whole[bs] = len(paths) / (time.perf_counter() - t)
        rows.append((f"whole path: decode + quality stats + forward, overlapped, batch {bs}",
                     f"{whole[bs]:7.1f}", f"as tasks.featurize.compute_chunk; "
                     f"{100 * whole[bs] / best:.0f}% of the best raw forward"))
    note("whole path done")

    print(f"\n## Featurization throughput ({len(paths)} Emotion6 photos, {args.threads} threads, "
          f"{what}; native bf16: {native_bf16()})\n")
    print("| step | images/s | note |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1].strip()} | {r[2]} |")
    print(f"\nbest raw forward: {best:.1f} img/s; whole path at its best batch: "
          f"{max(whole.values()):.1f} img/s ({100 * max(whole.values()) / best:.0f}%)")

    print(f"\n## Agreement with torch fp32 on the same {len(x)} photos ({what})\n")
    print("| engine | max abs prob diff | mean abs prob diff | top-1 agreement | feature cosine |")
    print("|---|---:|---:|---:|---:|")
    for name, (zo, po) in others.items():
        diff = np.abs(po - p32)
        agree = float((po.argmax(1) == p32.argmax(1)).mean())
        cos = (zo * z32).sum(1) / (np.linalg.norm(zo, axis=1) * np.linalg.norm(z32, axis=1)
                                   + 1e-12)
        print(f"| {name} | {diff.max():.2e} | {diff.mean():.2e} | {agree:.4f} | {cos.mean():.6f} |")
    _drift_decisions(ckpt, x, list(others), args.n_perm)


def _drift_decisions(ckpt, x: np.ndarray, others: list[str], n_perm: int) -> None:
    """The drift decision on a reference of 500 photos vs 240 others, clean and night, with
    torch fp32 and every other engine measured (both sides in the same one, as a model
    version always is)."""
    from PIL import Image

    from models.drift.base import CombinedDrift, DriftConfig
    from models.evaluate import extract_features
    from models.sim.conditions import apply_condition

    if len(x) < 740:
        print("\n(drift decision check skipped: needs --n >= 740)")
        return
    night = np.stack([ckpt.preprocessing.to_array(apply_condition(
        Image.fromarray(a), "night", 1, np.random.default_rng([7, i])))
        for i, a in enumerate(x[500:740])])
    ways = {"torch fp32": dict(engine="torch", precision="fp32"),
            "ONNX Runtime fp32": dict(engine="onnx", precision="fp32"),
            "torch bf16": dict(engine="torch", precision="bf16")}
    names = ["torch fp32", *others]
    print("\n## Drift decision by engine (MMD+BBSD, 500 reference vs 240 site photos, "
          f"{n_perm} permutations)\n")
    print("| site | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for name, site in (("clean", x[500:740]), ("night", night)):
        out = []
        for way in names:
            zr, pr = extract_features(ckpt, x[:500], **ways[way])
            zs, ps = extract_features(ckpt, site, **ways[way])
            det = CombinedDrift(DriftConfig(alpha=0.05, min_samples=30, n_permutations=n_perm),
                                (zr, pr), class_names=list(ckpt.classes))
            r = det.predict((zs, ps))
            out.append(f"{r.decision} (p={r.p_value:.3g})")
        print(f"| {name} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()

"""Source training benchmark: accuracy and cost of ``models.train.train_source`` on real data.

For each dataset / image size / number of fine-tuned blocks: a seeded leak-free split
(Emotion6: stratified; CK+48: by subject), train on train (early stopping on val), report
test accuracy and macro-F1, the wall time of training including the frozen-feature caching,
and inference throughput (full forward, batch 32, decoded images in memory).

With ``--probe`` it also fits the reference baseline of the data README on the same split:
logistic regression on standardised, global-average-pooled ImageNet features of the
unmodified EfficientNet-Lite0 (C chosen on val). Fine-tuning has to beat it.

    .venv/bin/python -m bench.train                         # Emotion6 + CK+48 (6 and 7 classes)
    .venv/bin/python -m bench.train --datasets emotion6 --img-sizes 224 160 --blocks 2 4 --probe

Needs the real data (``--data-dir``, default $EMOWATCH_DATA_DIR or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO
from models.data import LabelledSet, load_arrays, read_image_folder, three_way_split
from models.evaluate import evaluate, predict_arrays
from models.network import NetConfig, preprocessing_for
from models.train import TrainConfig, train_source

E6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
DATASETS = {
    # name: (folder, classes, aliases, split description)
    "emotion6": ("emotion6", None, None, "stratified"),
    "ck6": ("ckplus48", E6_CLASSES, {"happy": "joy"}, "subject"),
    "ck7": ("ckplus48", None, None, "subject"),
}


def load(data_dir: Path, name: str) -> LabelledSet:
    folder, classes, aliases, _ = DATASETS[name]
    return read_image_folder(data_dir / folder, classes=classes, aliases=aliases)


def throughput(ckpt, images: np.ndarray, batch: int = 32, repeats: int = 2) -> float:
    predict_arrays(ckpt, images[:batch], batch_size=batch)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        predict_arrays(ckpt, images, batch_size=batch)
    return repeats * len(images) / (time.perf_counter() - t)


def probe_accuracy(ls: LabelledSet, split, img_size: int) -> float:
    """Logistic regression on frozen ImageNet GAP features (the data README's baseline)."""
    from models.evaluate import iter_input_batches
    from models.network import EmotionNet

    cfg = NetConfig(img_size=img_size, trainable_blocks=0, multilevel=False)
    net = EmotionNet(cfg).eval()
    prep = preprocessing_for(cfg)
    feats = []
    with torch.no_grad():
        for x in iter_input_batches(ls.records, prep, 32):
            feats.append(net.top(net.frozen_forward(x)).numpy())  # (B, 1280) pooled
    return fit_probe(np.concatenate(feats), ls.labels, split)


def fit_probe(f: np.ndarray, y: np.ndarray, split) -> float:
    """Logistic regression on standardised features: C chosen on val, refit on train+val,
    test accuracy returned. ``split`` = (train, val, test) index lists."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, va, te = split
    sc = StandardScaler().fit(f[tr])
    best = max((LogisticRegression(C=c, max_iter=3000).fit(sc.transform(f[tr]), y[tr]).score(
        sc.transform(f[va]), y[va]), c) for c in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0))
    clf = LogisticRegression(C=best[1], max_iter=3000).fit(sc.transform(f[tr + va]), y[tr + va])
    return float(clf.score(sc.transform(f[te]), y[te]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("EMOWATCH_DATA_DIR") or REPO.parent / "shared" / "data"))
    ap.add_argument("--datasets", nargs="+", default=["emotion6", "ck6", "ck7"], choices=sorted(DATASETS))
    ap.add_argument("--img-sizes", nargs="+", type=int, default=[224])
    ap.add_argument("--blocks", nargs="+", type=int, default=[NetConfig().trainable_blocks],
                    help="NetConfig.trainable_blocks values to try")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--val-frac", type=float, default=0.15)
    ap.add_argument("--test-frac", type=float, default=0.15)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--crops", type=int, default=None)
    ap.add_argument("--head-epochs", type=int, default=None, help="TrainConfig.head_epochs (LP-FT)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is 2 cores)")
    ap.add_argument("--probe", action="store_true", help="also fit the frozen-feature baseline")
    ap.add_argument("--progress", action="store_true", help="tqdm bars on stderr")
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"data not found at {args.data_dir} (set --data-dir or EMOWATCH_DATA_DIR)")
    torch.set_num_threads(args.threads)

    rows = []
    header = ("| dataset | split | train/val/test | img | blocks | seed | best epoch | train s (incl. cache) "
              "| cache s | test acc | macro-F1 | probe acc | infer img/s |")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for name in args.datasets:
        ls = load(args.data_dir, name)
        for seed in args.seeds:
            split = three_way_split(ls.records, args.val_frac, args.test_frac, seed)
            tr, va, te = (ls.subset(p) for p in split)
            for size in args.img_sizes:
                probe = probe_accuracy(ls, split, size) if args.probe else None
                for blocks in args.blocks:
                    net = NetConfig(img_size=size, trainable_blocks=blocks)
                    cfg = TrainConfig(seed=seed, num_threads=args.threads)
                    if args.epochs:
                        cfg.epochs = args.epochs
                    if args.crops is not None:
                        cfg.crops = args.crops
                    if args.head_epochs is not None:
                        cfg.head_epochs = args.head_epochs
                    t = time.perf_counter()
                    res = train_source(tr, ls.classes, net, cfg, val=va, progress=args.progress or None)
                    wall = time.perf_counter() - t
                    ev = evaluate(res.checkpoint, te.records, te.labels)
                    imgs = load_arrays(te.records[:64], preprocessing_for(net))
                    ips = throughput(res.checkpoint, imgs)
                    row = (f"| {name} ({len(ls.classes)} cl.) | {DATASETS[name][3]} | "
                           f"{len(tr)}/{len(va)}/{len(te)} | {size} | {blocks} | {seed} | "
                           f"{res.best_epoch}/{len(res.history)} | {wall:.0f} | {res.cache_seconds:.0f} | "
                           f"{ev.accuracy:.3f} | {ev.macro_f1:.3f} | "
                           f"{'–' if probe is None else f'{probe:.3f}'} | {ips:.1f} |")
                    rows.append(row)
                    print(row, flush=True)
    print(f"\ntorch threads: {args.threads}; CPU count: {os.cpu_count()}; "
          f"load average at end: {os.getloadavg()[0]:.1f} (timings are pessimistic when > threads)")


if __name__ == "__main__":
    main()

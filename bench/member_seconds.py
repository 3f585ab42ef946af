"""Seconds each re-adaptation portfolio member takes for one set of images, on this machine.

    python -m bench.member_seconds [--n 240] [--precision fp32] [--members bn(N=80) tent ...]
                                   [--out bench/results/member_seconds.md]

The portfolio (``models.adapt.portfolio.run_portfolio``) starts a member only when its
expected seconds (``models.catalog.PORTFOLIO``'s ``expected_s`` per 240 images of each set,
the site's and every proxy's) fit into what is left of the budget. This measures them: each
member applied once (``apply_member``, as the portfolio does, with a budget it cannot reach) to
``--n`` Emotion6 photos, on a Lite0 source network at 224 px (ImageNet weights and an untrained
head: the seconds do not depend on what the head learnt); members that build on BN statistics
start from bn(N=80)'s result, as in the portfolio; members that need the training data get
``--n-source`` other photos. Torch uses the machine's cores; run it alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import E6_CLASSES, REPO, default_data_dir, source_net
from emowatch.hardware import resolve_precision
from models.adapt.base import CachedSet
from models.adapt.bn import frozen_outputs
from models.adapt.portfolio import EXPECTED_PER, SiteSet, apply_member, members
from models.catalog import DEFAULT_PORTFOLIO
from models.data import read_image_folder
from models.images import load_rgb
from models.network import EmotionNet, preprocessing_for


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--n", type=int, default=EXPECTED_PER, help="site images (default 240)")
    ap.add_argument("--n-source", type=int, default=600, help="training images for members "
                    "that need them (default 600)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    ap.add_argument("--members", nargs="*",
                    default=[m for m in DEFAULT_PORTFOLIO if m != "mmd-backbone"],
                    help="members to time (default: the portfolio but mmd-backbone, whose "
                         "catalog figure is 300 s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "member_seconds.md")
    args = ap.parse_args(argv)
    precision = resolve_precision(args.precision)
    e6 = read_image_folder(args.data_dir / "emotion6" / "images", classes=E6_CLASSES)
    order = np.random.default_rng(0).permutation(len(e6.records))
    site_idx, src_idx = order[:args.n], order[args.n:args.n + args.n_source]
    torch.manual_seed(0)
    model = EmotionNet(source_net()).eval()
    prep = preprocessing_for(model.config)

    def frozen(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        grids = np.stack([prep.to_array(load_rgb(e6.records[i].path)) for i in idx])
        x = prep.normalize(grids)
        return frozen_outputs(model, x, None, precision), x

    h_site, x_site = frozen(site_idx)
    site = SiteSet(h=h_site, images=x_site)
    h_src, _ = frozen(src_idx)
    source = CachedSet(h=h_src.float(), labels=torch.as_tensor(
        np.asarray([e6.records[i].label for i in src_idx])))
    by_name = {m.name: m for m in members()}
    base_member = by_name["bn(N=80)"]
    base = apply_member(base_member, model, site, source, None, None, 0, precision, 600.0)
    rows = [f"# Seconds per portfolio member for {args.n} images (Lite0 224 px, {precision}, "
            f"{torch.get_num_threads()} torch threads; bench.member_seconds)", "",
            "| member | seconds | per 240 images | catalog expected_s (bf16) "
            "| catalog expected_s_fp32 |",
            "|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for name in args.members:
        m = by_name[name]
        start_from = base if m.recipe.builds_on_bn else None
        t0 = time.perf_counter()
        apply_member(m, model, site, source if m.needs_source else None, start_from,
                     base_member if start_from is not None else None, 0, precision, 600.0)
        s = time.perf_counter() - t0
        row = (f"| {name} | {s:.1f} | {s * EXPECTED_PER / args.n:.1f} | "
               f"{m.params.get('expected_s', '-')} | {m.params.get('expected_s_fp32', '-')} |")
        rows.append(row)
        print(row, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

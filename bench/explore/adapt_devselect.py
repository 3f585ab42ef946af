"""Exploratory: would Deep Embedded Validation pick a good ``site_bn_weight`` per site?

Reads ``bench/adapt.py --methods adabn --site-bn-weight W --json-out F`` outputs, one file per
weight (name ending ``_w<W>.json``), and prints, per site and seed, each weight's gap
recovered / source drop (gate split, wide set) / DEV risk, and the weight DEV would pick: the
lowest DEV risk among the candidates whose source-accuracy gate passed.

    for w in 0.25 0.5 0.75 1.0; do .venv/bin/python -m bench.adapt --settings photos \\
        --methods adabn --site-bn-weight $w --json-out /tmp/sel_w$w.json; done
    .venv/bin/python -m bench.explore.adapt_devselect /tmp/sel_w*.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from bench.common import gap_recovered


def gap(r: dict) -> float:
    return gap_recovered(r["acc"], r["acc_source_only"], r["acc_clean"])


def main(paths: list[str]) -> None:
    rows = []
    for f in paths:
        w = float(f.rsplit("_w", 1)[1].removesuffix(".json"))
        rows += [{**r, "w": w} for r in json.load(open(f)) if r["method"] == "adabn"]
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["setting"], r["seed"])].append(r)
    weights = sorted({r["w"] for r in rows})
    print("| site | seed | " + " | ".join(f"w={w}: gap / drop(gate) / drop(wide) / DEV" for w in weights)
          + " | DEV picks (gate passed) | its gap / wide drop |")
    print("|---|---|" + "---|" * len(weights) + "---|---|")
    for (site, seed), rs in sorted(by.items()):
        rs.sort(key=lambda r: r["w"])
        cells = [f"{gap(r):+.2f} / {100 * r['source_drop']:+.1f} / {100 * r['source_drop_wide']:+.1f}"
                 f" / {r['dev_risk']:.3f}" for r in rs]
        ok = [r for r in rs if r["gate_source_accuracy"]]
        pick = min(ok, key=lambda r: r["dev_risk"]) if ok else None
        tail = (f"w={pick['w']} | {gap(pick):+.2f} / {100 * pick['source_drop_wide']:+.1f}"
                if pick else "none | –")
        print(f"| {site} | {seed} | " + " | ".join(cells) + f" | {tail} |")


if __name__ == "__main__":
    main(sys.argv[1:])

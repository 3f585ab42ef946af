"""One drifted site re-adapted end to end, timed per step: the product's flows on real photos.

    python -m bench.readapt_site [--condition night --severity 2] [--n-site 240]
                                 [--estimator twin] [--out bench/results/readapt_site.md]

In a temporary folder (the photos linked, never copied into the repository): ``train_source``
on the Emotion6 photos not used for the site (the default recipe; the models run in
``--precision``, fp32 by default; ``--estimator twin`` fits no shift bank), ``ingest_site`` of
``--n-site`` other photos under the condition (applied at their own size, saved as JPEG q95,
as a camera would), then ``readapt_site`` with the site's defaults (the portfolio judged on
the twin): re-adapt, validate, register the challenger. Each step's wall-clock seconds, and the
``readapt_site`` record's own split (loading and twin/proxies apart from the members). One
temporary Prefect server (``prefect_test_harness``) is started first and not counted. Run it
alone.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import E6_CLASSES, REPO, default_data_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--condition", default="night")
    ap.add_argument("--severity", type=int, default=2)
    ap.add_argument("--n-site", type=int, default=240)
    ap.add_argument("--estimator", default="twin", help="the source model's accuracy estimator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="the models' inference precision (Settings.inference_precision; "
                         "default fp32, what most machines have)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "readapt_site.md")
    ap.add_argument("--check", action="store_true",
                    help="run the scheduled check (monitor_site) before re-adapting, timed")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the folder here; a second run reuses its model and site")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a cProfile of the readapt_site step to this file")
    args = ap.parse_args(argv)

    from prefect.testing.utilities import prefect_test_harness

    from emowatch.prefect_env import startup_timeout_s
    from emowatch.settings import Settings
    from flows.ingest import ingest_site
    from flows.monitor import monitor_site
    from flows.readapt import readapt_site
    from flows.train import train_source
    from models.sim.conditions import apply_condition

    files = sorted((args.data_dir / "emotion6" / "images").rglob("*.jpg"))
    order = np.random.default_rng(args.seed).permutation(len(files))
    site_files = [files[i] for i in order[:args.n_site]]
    source_files = [files[i] for i in order[args.n_site:]]
    rows: list[tuple[str, float, str]] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            root = args.workdir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        done = root / "trained.json"
        reuse = done.exists()
        for f in [] if reuse else source_files:  # linked, not copied
            d = root / "source" / f.parent.name
            d.mkdir(parents=True, exist_ok=True)
            (d / f.name).symlink_to(f)
        inbox = root / "inbox" / "site"
        inbox.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([args.seed, 1])
        for i, f in enumerate([] if reuse else site_files):
            with Image.open(f) as im:
                img = apply_condition(im.convert("RGB"), args.condition, args.severity, rng)
            img.save(inbox / f"site-{i:04d}.jpg", quality=95)
        (root / "sites.toml").write_text(
            '[sites.site]\ninbox = "inbox/site"\napprovers = ["ops@example.org"]\n',
            encoding="utf-8")
        settings = Settings(home=root / "home", sites_file=root / "sites.toml", database_url=None,
                            mlflow_tracking_uri=None, smtp_host=None, task_runner="thread",
                            inference_precision=args.precision)
        with prefect_test_harness(server_startup_timeout=startup_timeout_s()):
            if not reuse:
                t0 = time.perf_counter()
                trained = train_source(data=str(root / "source"), classes=list(E6_CLASSES),
                                       seed=args.seed, estimator=args.estimator,
                                       settings=settings)
                rows.append(("train_source", time.perf_counter() - t0,
                             f"{len(source_files)} photos, {trained.get('precision')}, test "
                             f"accuracy {trained.get('test_accuracy', float('nan')):.3f}"))
                t0 = time.perf_counter()
                got = ingest_site(site="site", settings=settings)
                rows.append(("ingest_site", time.perf_counter() - t0,
                             f"{got.get('ingested')} photos ({args.condition} {args.severity})"))
                done.write_text(json.dumps({"rows": rows}), encoding="utf-8")
            if args.check:
                t0 = time.perf_counter()
                chk = monitor_site(site="site", ingest=False, settings=settings)
                est = chk.get("estimate") or {}
                rows.append(("monitor_site", time.perf_counter() - t0,
                             f"decision {chk.get('decision')}, impact {chk.get('impact')}, "
                             f"estimate {est.get('accuracy')}"))
            prof = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter()
            with prof or contextlib.nullcontext():
                out = readapt_site(site="site", settings=settings)
            wall = time.perf_counter() - t0
            if prof is not None:
                prof.dump_stats(str(args.profile))
            rows.append(("readapt_site", wall,
                         f"verdict {out.get('verdict')}, version {out.get('version')}"))
    lines = [f"# One site re-adapted end to end (bench.readapt_site: {args.condition} "
             f"{args.severity}, {args.n_site} photos, estimator {args.estimator}, "
             f"seed {args.seed})",
             "", "| step | seconds | what |", "|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {what} |" for name, s, what in rows]
    lines += ["", "readapt_site's own split: the portfolio "
              f"{out.get('adapt_seconds')} s, of which its setup (the twin and its proxies) "
              f"{out.get('setup_seconds')} s and the rest the members; the run "
              f"{out.get('seconds')} s (loading, the portfolio, validation, registration); "
              f"the flow {wall:.1f} s.", "",
              "| candidate | est. gain | lower bound | seconds | skipped |",
              "|---|---|---|---|---|"]
    for c in out.get("candidates") or []:
        e = c.get("estimate") or {}
        gain, low = e.get("gain"), e.get("lower")
        lines.append(f"| {c.get('name')} | "
                     + " | ".join("–" if v is None else f"{100 * v:+.1f}" for v in (gain, low))
                     + f" | {c.get('seconds')} | {c.get('skipped') or ''} |")
    lines += ["", f"reasons: {'; '.join(out.get('reasons') or [])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

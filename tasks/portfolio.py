"""Task of the readapt flow's portfolio path: the site's and the proxies' sets, then
``models.adapt.portfolio.run_portfolio``.

The proxies are the champion's labelled held-out training-domain images (validation + test)
as the site would see them: through the camera fitted to the site (its twin, site option
``adapt.judge = "twin"``, the default; the site's last check's camera is reused while it still
fits), or under the bank shifts nearest the site (``"bank"``). Every member is applied to them
as to the site, and its estimated gain is what it did there (``models.adapt.portfolio``).
Loading and the proxies are timed apart: the members get the whole ``portfolio_budget_s``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.sites import Site
from tasks.readapt import AdaptInputs, decode_grids


@task(name="adaptation-portfolio", cache_policy=NO_CACHE)
def run_portfolio_task(inputs: AdaptInputs, site: Site, seed: int = 0) -> Any:
    """Build the portfolio's candidates within ``adapt.portfolio_budget_s`` and select one
    (``models.adapt.portfolio``). The selected candidate's AdaptResult is ``result.chosen.applied``."""
    from models.adapt.base import CachedSet
    from models.adapt.portfolio import SiteSet, members, run_portfolio
    from models.adapt.proxies import ProxyConfig, build_proxies

    log = get_run_logger()
    t0 = time.perf_counter()
    site_g = decode_grids(inputs, inputs.site_paths)
    x_site = inputs.ckpt.preprocessing.normalize(site_g)
    inputs.site_images = x_site
    ref_g, labels = decode_grids(inputs, inputs.heldout_paths), np.asarray(inputs.heldout_labels)
    cfg = ProxyConfig(k=site.adapt.proxies, seed=seed, source=site.adapt.judge)
    twin = None
    if cfg.source == "twin":
        from models.adapt.proxies import twin_proxies
        from models.estimate.twin import previous_camera
        from models.estimate.twin_estimator import MAX_RESIDUAL
        from models.sim.camera import native_size

        grid = inputs.ckpt.preprocessing.img_size
        native = native_size(photo_sizes(inputs.site_paths), grid)
        last, last_r = previous_camera(inputs.previous_twin, grid, native)
        proxies, info, twin = twin_proxies(inputs.ckpt.model, inputs.ckpt.preprocessing, ref_g,
                                           labels, site_g, inputs.ckpt.precision, cfg,
                                           previous=last, previous_residual=last_r,
                                           native=native)
        proxy_s = time.perf_counter() - t0
        log.info("site twin in %.1f s: %s (residual %.2f%s)", proxy_s, twin.describe(),
                 twin.distance, ", the last check's camera" if twin.reused else "")
        if twin.distance > MAX_RESIDUAL:
            return unjudged(twin, info, proxy_s, MAX_RESIDUAL)
    else:
        proxies, info = build_proxies(inputs.ckpt.model, inputs.ckpt.preprocessing, ref_g, labels,
                                      site_g, inputs.site_h, inputs.ckpt.precision, cfg)
        proxy_s = time.perf_counter() - t0
        log.info("%d labelled proxies of %d held-out images in %.1f s: %s", len(proxies),
                 len(inputs.heldout_paths), proxy_s,
                 "; ".join(f"{p['shift']} (feature MMD2 {p['feature_mmd2']})" for p in info))
    source = None
    if inputs.src_train is not None or inputs.src_train_loader is not None:
        def source() -> CachedSet:  # computed only if a member that needs it starts
            h, y = inputs.source_train()
            return CachedSet(h=h, labels=y, images=inputs.src_train_images)
    res = run_portfolio(inputs.ckpt.model, SiteSet(h=inputs.site_h, images=x_site), proxies,
                        source, members(site.adapt.portfolio), site.adapt.portfolio_budget_s,
                        precision=inputs.ckpt.precision, seed=seed,
                        min_gain=site.adapt.min_gain / 100.0, progress=log.info,
                        tolerance=site.adapt.tolerance / 100.0, shared=twin is not None,
                        judged_on="twin draws" if twin is not None else "proxies")
    res.proxies = info
    res.setup_seconds = round(proxy_s, 2)
    if twin is not None:
        res.vouched = vouched_by(twin, MAX_RESIDUAL)
    res.seconds = time.perf_counter() - t0
    for r in res.reasons:
        log.info("%s", r)
    return res


def photo_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """(width, height) of each readable photo (its header only)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.size)
        except Exception:  # noqa: BLE001 -- validated at ingestion; an unreadable one is skipped
            continue
    return out


def vouched_by(twin: Any, limit: float) -> str:
    """What vouches for a candidate selected on the site's twin, in words (the verdict's
    reason when DEV alone would call the site unverifiable)."""
    return (f"the site's twin ({twin.describe()}) reproduces the site to a residual of "
            f"{twin.distance:.2f} (limit {limit:g}) and judged the gain on its labelled images")


def unjudged(twin: Any, info: list[dict[str, Any]], seconds: float, limit: float) -> Any:
    """The portfolio's result when the twin cannot reproduce the site: no candidate is built,
    since none could be judged (a change of content, not of camera: faces -> photos)."""
    from models.adapt.portfolio import CandidateRecord, Member, PortfolioResult

    reason = (f"no_gain: the site twin reproduces the site only to a residual of "
              f"{twin.distance:.1f} (limit {limit:g}; best camera: {twin.describe()}): the site is "
              f"not a camera condition of the training domain, so no candidate can be judged")
    return PortfolioResult([CandidateRecord(Member("champion", "champion"))], None, [reason],
                           seconds, proxies=info, setup_seconds=round(seconds, 2))


__all__ = ["run_portfolio_task", "unjudged", "vouched_by"]

"""Task of the readapt flow's portfolio path: the site's and the proxies' sets, then
``models.adapt.portfolio.run_portfolio``.

The proxies are the champion's labelled held-out training-domain images (validation + test)
under the shifts of a seeded bank (``models.sim.shifts``) whose image statistics come closest to
the site's; every member is applied to them as to the site, and its estimated gain is what it
did there (``models.adapt.portfolio``).
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
    proxies, info = build_proxies(inputs.ckpt.model, inputs.ckpt.preprocessing,
                                  decode_grids(inputs, inputs.heldout_paths),
                                  np.asarray(inputs.heldout_labels), site_g, inputs.site_h,
                                  inputs.ckpt.precision,
                                  ProxyConfig(k=site.adapt.proxies, seed=seed))
    log.info("%d labelled proxies of %d held-out images in %.1f s: %s", len(proxies),
             len(inputs.heldout_paths), time.perf_counter() - t0,
             "; ".join(f"{p['shift']} (feature MMD2 {p['feature_mmd2']})" for p in info))
    source = None
    if inputs.src_train is not None or inputs.src_train_loader is not None:
        def source() -> CachedSet:  # computed only if a member that needs it starts
            h, y = inputs.source_train()
            return CachedSet(h=h, labels=y, images=inputs.src_train_images)
    budget = max(1.0, site.adapt.portfolio_budget_s - (time.perf_counter() - t0))
    res = run_portfolio(inputs.ckpt.model, SiteSet(h=inputs.site_h, images=x_site), proxies,
                        source, members(site.adapt.portfolio), budget,
                        precision=inputs.ckpt.precision, seed=seed,
                        min_gain=site.adapt.min_gain / 100.0, progress=log.info)
    res.proxies = info
    res.seconds = time.perf_counter() - t0
    for r in res.reasons:
        log.info("%s", r)
    return res


__all__ = ["run_portfolio_task"]

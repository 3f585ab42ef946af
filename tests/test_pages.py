"""tasks.reports.pages (the drift report and the status page), the MMD witness and the gallery: known
answers on synthetic features, then the pages rendered in headless Chromium (DOM, console,
screenshots under the test's tmp dir or ``EMOWATCH_SCREENSHOT_DIR``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emowatch.sites import Site
from models.drift.base import DriftResult
from models.drift.mmd import witness

CLASSES = ["anger", "joy", "sadness"]


def test_witness_ranks_the_shifted_points_first():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8))
    cur = np.concatenate([rng.normal(size=(40, 8)), rng.normal(size=(10, 8)) + 4.0])
    w = witness(ref, cur)
    assert set(np.argsort(-w)[:10]) == set(range(40, 50))  # the 10 shifted points
    assert w[40:].min() > w[:40].max()
    with pytest.raises(ValueError):
        witness(ref, cur[:1])


def test_profiles_keep_typical_training_thumbnails_and_old_ones_still_load(tmp_path):
    from models.profile import ReferenceProfile, thumbnail_array, typical_indices

    z = np.array([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [-9.0, 9.0]])
    assert typical_indices(z, 2).tolist() == [2, 0]  # nearest the mean (0.275, 4.75) first
    t = thumbnail_array(Image.new("RGB", (120, 80), (200, 10, 10)), size=32)
    assert t.shape == (32, 32, 3) and t.dtype == np.uint8 and t[0, 0, 0] == 200
    p = ReferenceProfile(np.zeros((3, 4)), np.full((3, 3), 1 / 3), CLASSES,
                         thumbnails=np.zeros((2, 32, 32, 3), np.uint8))
    p.to_npz(tmp_path / "p.npz")
    assert ReferenceProfile.from_npz(tmp_path / "p.npz").thumbnails.shape == (2, 32, 32, 3)
    p.thumbnails = None
    p.to_npz(tmp_path / "old.npz")
    assert ReferenceProfile.from_npz(tmp_path / "old.npz").thumbnails is None


def _world(tmp_path: Path, n: int = 500):
    """A profile and a 500-image window whose last 50 images are darker and shifted."""
    from models.profile import ReferenceProfile
    from tasks.featurize import FeatureSet

    rng = np.random.default_rng(1)
    ref_z = rng.normal(size=(300, 16)).astype(np.float32)
    z = rng.normal(size=(n, 16)).astype(np.float32)
    z[-50:] += 3.0
    probs = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    paths = []
    for i in range(n):
        p = tmp_path / "store" / f"img{i:04d}.jpg"
        p.parent.mkdir(exist_ok=True)
        shade = 40 if i >= n - 50 else 170
        arr = (rng.random((64, 64, 3)) * 60 + shade).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    qref = {"brightness": rng.normal(0.6, 0.1, 300), "contrast": rng.normal(0.2, 0.05, 300)}
    qcur = {"brightness": rng.normal(0.5, 0.1, n), "contrast": rng.normal(0.2, 0.05, n)}
    profile = ReferenceProfile(features=ref_z, probs=rng.dirichlet(np.ones(3), 300).astype(
        np.float32), classes=CLASSES, quality=qref,
        thumbnails=(rng.random((8, 64, 64, 3)) * 255).astype(np.uint8))
    fs = FeatureSet([f"sha{i}" for i in range(n)], z, probs, qcur)
    sub = DriftResult(True, "drift", 1e-4, 0.12, 0.025, "mmd", 300, n, {})
    result = DriftResult(True, "drift", 2e-4, 0.12, 0.05, "mmd+bbsd", 300, n,
                         {"correction": "bonferroni x2", "triggered_by": "mmd",
                          "mmd": sub.to_dict(),
                          "bbsd": DriftResult(False, "no_drift", 0.4, 1.0, 0.025, "bbsd", 300, n,
                                              {}).to_dict()})
    est = {"accuracy": 0.31, "low": 0.26, "high": 0.36, "source_accuracy": 0.53, "drop": 0.22,
           "drop_low": 0.17, "drop_high": 0.27, "method": "meta-gbm", "verifiable": True}
    return profile, fs, paths, result, est


def _report(tmp_path: Path) -> tuple[str, list[str]]:
    from tasks.reports.pages import check_report_html

    profile, fs, paths, result, est = _world(tmp_path)
    site = Site(name="night-cam", inbox=str(tmp_path / "in"), approvers=["ann@x.org"])
    html = check_report_html(site=site, check_id=7, model="emowatch-night-cam/1", result=result,
                             phrases=["darker (brightness 0.60 -> 0.50)"], estimate=est,
                             impact="harmful", notified=True, profile=profile, fs=fs,
                             paths=paths, evidently=str(tmp_path / "ev.html"),
                             mlflow_run="abc123")
    return html, paths


def test_the_check_report_says_what_matters_and_stays_small(tmp_path):
    html, paths = _report(tmp_path)
    assert len(html.encode()) < 1_000_000  # a 500-image window
    assert "night-cam: accuracy ~0.31 [0.26, 0.36], was 0.53 - harmful" in html
    assert "<td>mmd</td>" in html and "<td>bbsd</td>" in html  # one row per test
    assert "darker (brightness 0.60 -&gt; 0.50)" in html  # autoescaped
    strip = html.split('id="atypical"')[1].split("</div>")[0]
    # the 8 most atypical images are among the 50 shifted ones (file names img0450..img0499)
    names = [int(x[:4]) for x in strip.split('alt="site image img')[1:]]
    assert len(names) == 8 and all(i >= 450 for i in names)
    assert "http" not in html.split("<main>")[0]  # nothing fetched from a CDN


def _chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("EMOWATCH_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (EMOWATCH_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def browse(page: Path, shot: Path, tmp_path: Path) -> str:
    """The DOM of a local page after it rendered, its screenshot, and no console errors."""
    browser = _chromium()
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chrome'}",
            "--window-size=1200,1600"]
    r = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                       timeout=600)
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=600, check=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    return r.stdout


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("EMOWATCH_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_the_report_in_a_browser(tmp_path):
    html, _ = _report(tmp_path)
    page = tmp_path / "check-7.html"
    page.write_text(html)
    dom = browse(page, _shots(tmp_path) / "report.png", tmp_path)
    for element in ('id="decision"', 'id="headline"', 'id="estimate"', 'id="tests"',
                    'id="changes"', 'id="atypical"', 'id="typical"'):
        assert element in dom
    assert dom.count('alt="site image') == 16 and dom.count('alt="training ') == 8


def test_the_status_page_in_a_browser(tmp_path):
    from db import checks
    from db.session import session_scope
    from emowatch.settings import Settings
    from tasks.context import Runtime
    from tasks.reports.pages import check_report_path, write_status_page

    rt = Runtime.open(Settings(home=tmp_path / "home", database_url=None, smtp_host=None,
                               sites_file=tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text('[sites.night-cam]\ninbox = "in"\n'
                                         'approvers = ["ann@x.org"]\n')
    ctx = rt.site_context("night-cam")
    with session_scope(rt.engine) as s:
        for i in range(12):
            acc = 0.52 - 0.02 * i
            cid = checks.add_check(
                s, site_id=ctx.site_id, model_name="emowatch-night-cam", model_version="1",
                decision="drift" if i > 6 else "no_drift", p_value=10.0 ** -i, statistic=0.1,
                threshold=0.05, method="mmd", n_ref=300, n_cur=200, image_ids=[], details={},
                estimate={"accuracy": acc, "low": acc - 0.05, "high": acc + 0.05},
                impact="harmful" if i > 6 else "harmless")
    report = check_report_path(rt.settings.reports_dir, "night-cam", cid)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html><body>report</body></html>")
    page = write_status_page(rt)
    dom = browse(page, _shots(tmp_path) / "status.png", tmp_path)
    assert 'id="sites"' in dom and "night-cam" in dom
    assert f'href="night-cam/check-{cid}.html"' in dom  # each check links its report
    assert "estimated accuracy" in dom and "30.0% [25.0%, 35.0%]" in dom
    assert dom.count("data:image/png;base64") == 1  # the site's history chart


def test_the_gallery_names_classes_and_has_one_colour_scale(tmp_path):
    from models.explain.plots import gallery_figure

    rng = np.random.default_rng(0)
    imgs = (rng.random((2, 32, 32, 3)) * 255).astype(np.uint8)
    champ, chall = rng.normal(size=(2, 32, 32)), rng.normal(size=(2, 32, 32))
    p1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    p2 = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    fig = gallery_figure(imgs, champ, chall, titles=["a", "b"], champ_probs=p1,
                         chall_probs=p2, classes=CLASSES)
    titles = [ax.get_title() for ax in fig.axes]
    assert "champion: anger 70%" in titles and "challenger: sadness 70%" in titles
    bars = [ax for ax in fig.axes if "raises" in ax.get_xlabel()]
    assert len(bars) == 1  # one legend for the whole gallery
    shot = _shots(tmp_path) / "gallery.png"
    fig.savefig(shot, dpi=80)
    assert shot.stat().st_size > 10_000

"""The main job, end to end: ``emowatch demo --fast`` (generated faces, tiny CNN, ~1 minute).

The real-data demo (EfficientNet-Lite0 on Emotion6, ~2-3 minutes) is the same flow with
``fast=False``; its timing is in the README."""

from __future__ import annotations

import shutil
from pathlib import Path


def test_demo_fast_catches_drift_registers_challengers_and_promotes(tmp_path, prefect_harness,
                                                                     settings):
    """The demo runs on its own settings (home, sites file) derived from the caller's: the
    environment is not touched and the caller's state stays empty."""
    import os

    from flows.demo import demo

    workdir = tmp_path / "demo"
    def ours() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith("EMOWATCH_")}

    env_before = ours()
    out = demo(workdir=str(workdir), fast=True, settings=settings)
    assert ours() == env_before
    assert not (settings.home / "emowatch.db").exists()
    assert out["data"] == "generated" and out["source"]["test_accuracy"] > 0.6
    sites = {r["site"]: r for r in out["sites"]}
    assert set(sites) == {"lobby", "night-cam", "blur-cam"}
    assert sites["lobby"]["decision"] == "no_drift" and sites["lobby"]["challenger"] is None
    for name in ("night-cam", "blur-cam"):
        row = sites[name]
        assert row["decision"] == "drift" and row["p_value"] < 0.05
        assert row["challenger"] and row["verdict"] in ("pass", "fail", "unverifiable")
        assert row["gates"].count("/") == 1  # "passed/total"
        assert Path(row["report_html"]).is_file()
        for plot in ("explanations", "embedding"):  # drawn from the gate's own maps
            assert Path(row["plots"][plot]).is_file(), row["plots"]
    # night-cam is an auto site: an unverifiable or failed challenger must NOT be promoted by
    # itself; a promoted site's champion is the challenger
    night = sites["night-cam"]
    assert night["promoted"] == (night["verdict"] == "pass")
    assert any(r["promoted"] for r in sites.values())
    for r in sites.values():
        expect = r["challenger"] if r["promoted"] else "1"
        assert r["champion"].endswith(f"/{expect}")
    state = workdir / "state"
    assert list((state / "outbox").glob("*.eml"))  # drift / approval e-mails kept as .eml
    assert "finished in" in out["summary_text"] and "mlflow ui" in out["summary_text"]
    # the status page links every site's latest check report; its screenshot where a browser is
    page = Path(out["status_page"])
    html = page.read_text()
    for name in sites:
        assert f'href="#site-{name}"' in html
    linked = [part.split('"')[0] for part in html.split('href="')[1:] if "check-" in part[:60]]
    assert linked and all((page.parent / link).is_file() for link in linked)
    if shutil.which("chromium") or os.environ.get("EMOWATCH_REQUIRE_BROWSER"):
        assert out["status_screenshot"] and Path(out["status_screenshot"]).stat().st_size > 10_000

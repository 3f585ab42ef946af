from __future__ import annotations

import json

import numpy as np
import pytest

from bench.evidently_baseline import evidently_decision, evidently_embeddings_decision
from models.quality import batch_stats, describe_shift, image_stats
from tasks.reports.evidently import (
    PCAProjection,
    add_to_workspace,
    build_drift_report,
    dataset_drift,
    monitoring_frame,
    save_report,
)

CLASSES = ["anger", "joy", "sadness"]


def _site(rng, n, shift=0.0, d=16):
    z = (rng.normal(size=(n, d)) + shift).astype(np.float32)
    logits = rng.normal(size=(n, 3)) + np.array([0.0, 2.0 * shift, 0.0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    quality = {"brightness": rng.uniform(0.3, 0.6, n) - 0.2 * shift, "sharpness": rng.gamma(4, 60, n)}
    return z, probs, quality


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    z_ref, p_ref, q_ref = _site(rng, 150)
    pca = PCAProjection.fit(z_ref, n_components=4)
    ref = monitoring_frame(z_ref, p_ref, CLASSES, pca, q_ref)
    same = monitoring_frame(*_site(rng, 60)[:2], CLASSES, pca, _site(rng, 60)[2])
    z_cur, p_cur, q_cur = _site(rng, 60, shift=1.0)
    shifted = monitoring_frame(z_cur, p_cur, CLASSES, pca, q_cur)
    return ref, same, shifted, pca


def test_pca_and_frame_columns(frames):
    ref, _, _, pca = frames
    assert list(ref.columns) == ["pc_1", "pc_2", "pc_3", "pc_4", "pred_class", "confidence",
                                 "brightness", "sharpness"]
    assert np.all(np.diff(pca.explained_variance_ratio) <= 1e-12)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-8)
    assert set(ref["pred_class"]) <= set(CLASSES)
    with pytest.raises(ValueError, match="features must be"):
        pca.transform(np.zeros((3, 5)))


def test_report_builds_and_decides(frames):
    ref, same, shifted, _ = frames
    snap = build_drift_report(ref, shifted)
    d = dataset_drift(snap)
    assert d["is_drift"] is True and d["share"] >= 0.5
    assert set(d["per_column"]) == set(ref.columns)
    assert evidently_decision(ref, same)["is_drift"] is False
    # the fast path runs the same tests as the Report: same per-column values, same decision
    for cur in (same, shifted):
        slow, fast = evidently_decision(ref, cur), evidently_decision(ref, cur, fast=True)
        assert fast["is_drift"] == slow["is_drift"] and fast["n_drifted"] == slow["n_drifted"]
        for col, v in slow["per_column"].items():
            assert fast["per_column"][col]["value"] == pytest.approx(v["value"], rel=1e-9, abs=1e-12)


def test_report_written_as_html_and_json(frames, tmp_path):
    ref, _, shifted, _ = frames
    snap = build_drift_report(ref, shifted, name="site-a 2026-01-01")
    html, js = tmp_path / "out" / "r.html", tmp_path / "out" / "r.json"
    save_report(snap, html, js)
    assert html.stat().st_size > 10_000 and "<html" in html.read_text()[:2000].lower()
    body = json.loads(js.read_text())
    assert any("DriftedColumnsCount" in m["metric_name"] for m in body["metrics"])


def test_workspace_one_project_per_site(frames, tmp_path):
    from evidently.ui.workspace import Workspace

    ref, same, shifted, _ = frames
    ws_dir = tmp_path / "ws"
    a1 = add_to_workspace(ws_dir, "site-a", build_drift_report(ref, same))
    a2 = add_to_workspace(ws_dir, "site-a", build_drift_report(ref, shifted))
    add_to_workspace(ws_dir, "site-b", build_drift_report(ref, shifted))
    assert a1 != a2
    ws = Workspace(str(ws_dir))
    runs = {p.name: len(ws.list_runs(p.id)) for p in ws.list_projects()}
    assert runs == {"site-a": 2, "site-b": 1}


def test_workspace_write_reads_no_snapshots(frames, tmp_path, monkeypatch):
    """Adding a snapshot never opens a Workspace (which parses every stored snapshot, so a
    check's cost would grow with the monitor's age); the UI's Workspace still reads them."""
    from evidently.ui import workspace

    ref, same, shifted, _ = frames
    ws_dir = tmp_path / "ws"
    add_to_workspace(ws_dir, "site-a", build_drift_report(ref, same))

    def refuse(*_a, **_k):
        raise AssertionError("Workspace opened while adding a snapshot")

    with monkeypatch.context() as m:
        m.setattr(workspace.Workspace, "__init__", refuse)
        ids = {add_to_workspace(ws_dir, "site-a", build_drift_report(ref, shifted)),
               add_to_workspace(ws_dir, "site-b", build_drift_report(ref, same))}
    assert len(ids) == 2
    ws = workspace.Workspace(str(ws_dir))
    by_name = {p.name: {str(r) for r in ws.list_runs(p.id)} for p in ws.list_projects()}
    assert sorted(by_name) == ["site-a", "site-b"] and len(by_name["site-a"]) == 2
    assert ids <= by_name["site-a"] | by_name["site-b"]


def test_embeddings_decision_methods():
    rng = np.random.default_rng(1)
    z_ref, z_cur = rng.normal(size=(120, 8)), rng.normal(size=(60, 8)) + 1.5
    for m in ("default", "mmd", "distance"):
        r = evidently_embeddings_decision(z_ref, z_cur, m)
        assert r["is_drift"] is True and isinstance(r["score"], float)
    with pytest.raises(ValueError, match="unknown method"):
        evidently_embeddings_decision(z_ref, z_cur, "magic")


def test_mismatched_frames_are_rejected(frames):
    ref, _, shifted, _ = frames
    with pytest.raises(ValueError, match="same columns"):
        build_drift_report(ref, shifted.drop(columns=["brightness"]))


# --- quality statistics (models/quality.py) ----------------------------------------------------
def test_quality_stats_react_to_conditions():
    from models.sim.conditions import apply_condition

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:96, 0:128] / 128
    imgs = []
    for _ in range(12):
        f = rng.uniform(3, 9, 3)
        base = np.stack([np.sin(f[0] * xx), np.cos(f[1] * yy), np.sin(f[2] * (xx + yy))], -1)
        imgs.append(np.clip(128 + 90 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    ref = batch_stats(imgs)
    assert describe_shift(ref, batch_stats(imgs)) == []
    dark = batch_stats([apply_condition(i, "night", 2, rng) for i in imgs])
    phrases = describe_shift(ref, dark)
    assert any(p.startswith("darker (brightness \u2212") for p in phrases), phrases
    blurred = describe_shift(ref, batch_stats([apply_condition(i, "blur", 2) for i in imgs]))
    assert blurred[0].startswith("blurrier (sharpness \u2212"), blurred
    grey = describe_shift(ref, batch_stats([apply_condition(i, "greyscale", 2) for i in imgs]))
    assert "less colourful (colourfulness \u2212100%)" in grey
    s = image_stats(imgs[0])
    assert s["width"] == 128 and s["height"] == 96 and s["aspect"] == pytest.approx(128 / 96)

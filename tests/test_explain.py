"""models/explain/base.py: DnCShap, occlusion and integrated gradients on images behind one verb;
bf16 forwards; and the explanation figures (models/explain/plots.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from models.explain.base import (
    DnCShap,
    Explainer,
    IntegratedGradients,
    Occlusion,
    image_partition,
    make_baseline,
    make_explainer,
)
from models.explain.metrics import (
    rank_correlation,
)
from models.explain.plots import gallery_figure, overlay_figure
from models.explain.shapley import PartitionTree, dnc_coalitions
from models.sim.synthetic import make_faces
from tests.explain_helpers import tiny_net


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny 64 px convs gain nothing from a second thread, and on a shared 2-core machine
    oversubscription makes them ~10x slower: run this module single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- image explainers ----------------------------------------------------------------------------
def test_image_partition_tiles_the_image():
    for h, w, d, kind in [(64, 64, 6, "binary"), (64, 64, 3, "quad"), (48, 80, 5, "binary")]:
        p = image_partition(h, w, d, kind)
        area = np.zeros((h, w), int)
        for x0, y0, x1, y1 in p.boxes:
            area[y0:y1, x0:x1] += 1
        assert (area == 1).all()
    a = image_partition(64, 64, 6, "binary").boxes
    b = image_partition(64, 64, 3, "quad").boxes
    assert {tuple(x) for x in a} == {tuple(x) for x in b}  # same 8x8 grid, other hierarchy
    assert ((a[:, 2] - a[:, 0]) == 8).all() and ((a[:, 3] - a[:, 1]) == 8).all()
    with pytest.raises(ValueError, match="too small"):
        image_partition(4, 4, 6)


def test_dncshap_on_images_efficiency_calls_and_ignored_region():
    net = tiny_net()
    keep = torch.ones(1, 3, 64, 64)
    keep[..., :, :32] = 0.0  # the model never sees the left half

    calls = []

    def model(x):
        calls.append(x.shape[0])
        return net(x * keep)

    x = torch.randn(2, 3, 64, 64)
    for depth, n_evals in [(4, 60), (6, 252)]:
        calls.clear()
        a = DnCShap(model, depth=depth, batch_size=50).attribute(x, baseline="mean")
        assert a.maps.shape == (2, 64, 64) and a.region_values.shape == (2, 2 ** depth)
        assert np.abs(a.efficiency_gap).max() < 1e-12
        np.testing.assert_allclose(a.maps.sum((1, 2)), a.f_image - a.f_baseline, atol=1e-5)
        assert (a.model_calls == n_evals).all() and sum(calls) == 2 * n_evals
        left = a.boxes[:, 2] <= 32
        assert np.abs(a.region_values[:, left]).max() < 1e-6
        assert np.abs(a.region_values[:, ~left]).max() > 1e-6
    q = DnCShap(model, depth=2, partition="quad").attribute(x, baseline="zeros")
    assert q.region_values.shape == (2, 16) and np.abs(q.efficiency_gap).max() < 1e-12
    assert (q.model_calls == dnc_coalitions(PartitionTree.balanced(2, 4)).shape[0]).all()


def test_occlusion_and_integrated_gradients():
    net = tiny_net(1)
    x = torch.randn(2, 3, 64, 64)
    occ = Occlusion(net, depth=2, precision="fp32").attribute(x, target=1, baseline="zeros")
    assert (occ.targets == 1).all() and (occ.model_calls == 6).all()
    x0 = x.clone()
    x0[:, :, :, :32][..., :32, :] = 0.0  # region 0 of depth 2 is the top-left quarter
    with torch.no_grad():
        p = torch.softmax(net(torch.cat([x, x0])), 1)[:, 1].double().numpy()
    np.testing.assert_allclose(occ.region_values[:, 0], p[:2] - p[2:], atol=1e-6)
    ig = IntegratedGradients(net, steps=64, depth=4).attribute(x, baseline="blur")
    scale = np.abs(ig.f_image - ig.f_baseline).max()
    assert np.abs(ig.efficiency_gap).max() < 0.05 * max(scale, 1e-3) + 1e-4
    np.testing.assert_allclose(ig.region_values.sum(1), ig.maps.sum((1, 2)), rtol=1e-4, atol=1e-6)


def test_baselines_and_validation():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(make_baseline(x, "zeros"), torch.zeros_like(x))
    m = make_baseline(x, "mean")
    assert torch.allclose(m[:, :, 0, 0], x.mean((2, 3)))
    b = make_baseline(x, "blur")
    assert b.shape == x.shape and b.std() < x.std() / 2
    assert torch.allclose(b.mean((2, 3)), x.mean((2, 3)), atol=0.05)
    assert torch.equal(make_baseline(x, torch.ones(3, 1, 1)), torch.ones_like(x))
    with pytest.raises(ValueError, match="baseline"):
        make_baseline(x, "noise")
    with pytest.raises(ValueError, match="broadcast"):
        make_baseline(x, torch.ones(5, 5))
    e = DnCShap(tiny_net(), depth=2)
    with pytest.raises(ValueError, match="N,3,H,W"):
        e.attribute(torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="floats"):
        e.attribute(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="target"):
        e.attribute(x, target=9)
    with pytest.raises(ValueError, match="one per image"):
        e.attribute(x, target=[0, 1, 2])
    with pytest.raises(ValueError, match="depth"):
        DnCShap(tiny_net(), depth=0)
    with pytest.raises(ValueError, match="unknown explainer"):
        make_explainer("lime", tiny_net())
    with pytest.raises(ValueError, match="partition"):
        DnCShap(tiny_net(), partition="hex")


class UniformExplainer(Explainer):
    """A new (toy) explainer: the change from baseline to image shared equally by the
    regions (efficiency holds by construction)."""

    name = "uniform"

    def _attribute(self, x, targets, base, parts, p_img):
        n, r = x.shape[0], parts.boxes.shape[0]
        f_base = np.array([self._probs(base[i:i + 1], int(targets[i]))[0] for i in range(n)])
        regions = np.repeat(((p_img - f_base) / r)[:, None], r, axis=1)
        maps = regions[:, parts.leaf_map]  # (n, H, W)
        return self._record(maps, regions, parts, targets, p_img, f_base, np.full(n, 2))


def test_a_new_explainer_is_one_class_and_one_catalog_line(monkeypatch):
    from models import catalog

    monkeypatch.setitem(catalog.EXPLAINERS, "uniform", "tests.test_explain:UniformExplainer")
    e = make_explainer("uniform", tiny_net(), depth=2)
    att = e.attribute(torch.randn(2, 3, 32, 32))
    assert isinstance(e, UniformExplainer) and att.method == "uniform"
    assert att.region_values.shape == (2, 4) and np.allclose(att.efficiency_gap, 0, atol=1e-9)


def test_model_left_in_train_mode_is_restored():
    net = tiny_net().train()
    DnCShap(net, depth=2).attribute(torch.randn(1, 3, 32, 32))
    assert net.training




def test_figures():
    imgs = make_faces(2, 48, seed=0).images
    maps = np.random.default_rng(0).normal(size=(2, 48, 48))
    fig = gallery_figure(imgs, maps, -maps, titles=["a", "b"])
    assert len(fig.axes) == 7  # 2 rows x 3 panels + the one shared colour bar
    fig2 = overlay_figure(imgs[0], maps[0], image_partition(48, 48, 4).boxes, title="x")
    buf = io.BytesIO()
    fig2.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"




def test_bf16_forwards_keep_efficiency_and_agree_with_fp32():
    net = tiny_net(3)
    x = torch.randn(2, 3, 64, 64)
    a = DnCShap(net, depth=4, precision="fp32").attribute(x, baseline="blur")
    b = DnCShap(net, depth=4, precision="bf16").attribute(x, target=a.targets, baseline="blur")
    for att in (a, b):  # exact for the scores each precision reports
        assert np.abs(att.efficiency_gap).max() < 1e-9
    assert b.params["precision"] == "bf16" and a.params["precision"] == "fp32"
    np.testing.assert_allclose(b.f_image, a.f_image, atol=2e-2)
    assert rank_correlation(a, b).mean() > 0.8
    assert DnCShap(net, precision="auto").precision in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        DnCShap(net, precision="fp8")  # type: ignore[arg-type]


def test_attribution_take_selects_images():
    a = DnCShap(tiny_net(4), depth=2).attribute(torch.randn(3, 3, 64, 64))
    one, two = a.take(1), a.take([0, 2])
    assert one.maps.shape[0] == 1 and two.region_values.shape[0] == 2
    np.testing.assert_array_equal(one.region_values[0], a.region_values[1])
    np.testing.assert_array_equal(two.targets, a.targets[[0, 2]])
    assert one.boxes is a.boxes or np.array_equal(one.boxes, a.boxes)

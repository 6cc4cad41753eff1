"""The CelebA network of FAMO's 40-attribute experiment (``Cranial-XIX/FAMO``,
``experiments/celeba/models.py``; Liu et al., "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023).

A 9-layer network: 3x3 convolutions without bias, each followed by BN and ReLU, with widths
``64 | 128 128 | 256 256 | 512 512`` and 2x2 max pooling after the first, third and fifth conv,
global average pooling, then two 512-wide linear layers (no bias, BN, ReLU). The shared trunk
ends in a 512-d representation; every attribute has a linear head giving one logit (the reference
applies a sigmoid and BCE; the logit with ``binary_cross_entropy_with_logits`` is the same loss,
computed stably).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from ..architectures import MultiTaskModel

__all__ = ["CelebANet"]


def _conv(cin: int, cout: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CelebANet(MultiTaskModel):
    """FAMO's CelebA trunk with one logit head per task; ``width`` scales every layer (1 = paper).

    >>> import torch
    >>> m = CelebANet(["Smiling", "Young"], width=0.125)
    >>> {k: tuple(v.shape) for k, v in m(torch.randn(2, 3, 16, 16)).items()}
    {'Smiling': (2, 1), 'Young': (2, 1)}
    """

    def __init__(self, tasks: Sequence[str], width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("CelebANet: at least one task is needed")
        self.task_names = list(tasks)
        c = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        layers: list[nn.Module] = [*_conv(in_channels, c[0]), nn.MaxPool2d(2, 2)]
        layers += [*_conv(c[0], c[1]), *_conv(c[1], c[1]), nn.MaxPool2d(2, 2)]
        layers += [*_conv(c[1], c[2]), *_conv(c[2], c[2]), nn.MaxPool2d(2, 2)]
        layers += [*_conv(c[2], c[3]), *_conv(c[3], c[3]), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers += [nn.Linear(c[3], c[3], bias=False), nn.BatchNorm1d(c[3]), nn.ReLU(inplace=True)]
        layers += [nn.Linear(c[3], c[3], bias=False), nn.BatchNorm1d(c[3]), nn.ReLU(inplace=True)]
        self.shared_base = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(c[3], 1) for t in self.task_names})

    def encode(self, x: Any) -> Tensor:
        return self.shared_base(x)

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        return {t: h(features) for t, h in self.heads.items()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.shared_base.parameters())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(self.heads[task].parameters())

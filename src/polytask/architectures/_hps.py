"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from ._base import MultiTaskModel, register


@register(
    "hps",
    paper="Caruana, 'Multitask Learning', Machine Learning 28, 1997",
    description="Hard parameter sharing: shared encoder, one head per task.",
)
class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana 1997): ``heads[t](encoder(x))`` for every task ``t``.

    Args:
        encoder: any module mapping the input to a representation.
        heads: one module per task name, each mapping the representation to that task's output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = HardSharing(nn.Linear(4, 8), {"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 3), 'b': (5, 1)}
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("HardSharing needs at least one task head")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.task_names = list(heads)

    def encode(self, x: Any) -> Tensor:
        return self.encoder(x)

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        return {t: head(features) for t, head in self.heads.items()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return self.heads[task].parameters()

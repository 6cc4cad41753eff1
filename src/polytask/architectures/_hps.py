"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from ._base import register
from ._common import Result, _Model, check_heads, unique_params


@register(
    "hps",
    paper="Caruana, 'Multitask Learning', Machine Learning 28, 1997",
    description="Hard parameter sharing: shared encoder, one head per task.",
    representation="always",
)
class HardSharing(_Model):
    """Hard parameter sharing (Caruana, Machine Learning 1997): ``heads[t](encoder(x))``.

    Args:
        encoder: any module mapping the input to a representation (MLP, CNN, transformer, a
            module taking dict batches).
        heads: one module per task name, each mapping the representation to that task's output.

    Shared parameters: the encoder. Task ``t``: its head. Representation: ``encode(x)`` is the
    encoder output, ``decode(features)`` applies the heads (it needs nothing else, so it can be
    called on any features). Multi-input batches ``{task: x_t}``: the encoder runs on each task's
    input and only task ``t``'s head on it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = HardSharing(nn.Linear(4, 8), {"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 3), 'b': (5, 1)}
        >>> out = m({"a": torch.randn(2, 4), "b": torch.randn(7, 4)})  # one input per task
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'a': (2, 3), 'b': (7, 1)}
    """

    _has_encode = True
    _decode_needs_ctx = False

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("HardSharing needs at least one task head")
        self.task_names = check_heads(heads)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        return self.encoder(x), None

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        return {t: self.heads[t](features) for t in tasks}, None, {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(unique_params(self.encoder))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self.heads[task]))

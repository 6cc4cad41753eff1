"""Entire space multi-task model (ESMM) for post-click conversion rate estimation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import register
from ._common import Result, _Model, check_heads, pack, unique_params, unpack


@register(
    "esmm",
    paper="Ma et al., 'Entire Space Multi-Task Model: An Effective Approach for Estimating "
    "Post-Click Conversion Rate', SIGIR 2018",
    description="Shared embedding, CTR and CVR towers; outputs pCTR and pCTCVR = pCTR * pCVR.",
    representation="always",
    outputs="probabilities",
)
class ESMM(_Model):
    """Entire space multi-task model (Ma et al., SIGIR 2018).

    A shared encoder (the paper's shared embedding, or any module) feeds a CTR tower and a CVR
    tower; both are trained over the entire impression space through
    ``pCTCVR = pCTR * pCVR`` with ``pCTR = sigmoid(ctr_tower(h))`` and
    ``pCVR = sigmoid(cvr_tower(h))``. The outputs are **probabilities** (use
    ``binary_cross_entropy``, not the with-logits loss): ``{ctr_name: pCTR, ctcvr_name: pCTCVR}``;
    pCVR of the last forward is kept in ``last_pcvr`` (detached) for serving. The record says
    ``outputs="probabilities"``: train with ``Task.binary(name, probability=True)`` (configs:
    ``tasks.binary: probability``; ``configs/movielens_esmm.yaml`` is a full example, with the
    paper's shared embedding as :class:`~polytask.architectures.FieldEmbedding`).

    Args:
        encoder: shared module mapping the batch to the towers' input.
        ctr_tower, cvr_tower: modules mapping the representation to one logit per sample
            (e.g. ``[B, 1]``).
        task_names: names of the (click, click-and-conversion) outputs, default
            ``("ctr", "ctcvr")``.

    Shared parameters: the encoder and the CTR tower (pCTCVR uses pCTR, so both tasks' losses
    reach it). Task ``ctcvr_name``: the CVR tower. Task ``ctr_name`` has no parameters of its own.

    Representation: everything both tasks read, i.e. the encoder output ``h`` and the CTR logit,
    flattened and concatenated to ``[B, numel(h) + numel(logit)]``; ``decode`` applies the sigmoid
    and the CVR tower. Multi-input batches ``{task: x_t}``: each task's input runs through the
    encoder and the towers it needs.

    Example:
        >>> import torch
        >>> m = ESMM(nn.Linear(6, 8), nn.Linear(8, 1), nn.Linear(8, 1))
        >>> out = m(torch.randn(4, 6))
        >>> sorted(out), bool((out["ctcvr"] <= out["ctr"]).all())
        (['ctcvr', 'ctr'], True)
    """

    _has_encode = True

    def __init__(
        self,
        encoder: nn.Module,
        ctr_tower: nn.Module,
        cvr_tower: nn.Module,
        task_names: Sequence[str] = ("ctr", "ctcvr"),
    ) -> None:
        super().__init__()
        names = list(task_names)
        if len(names) != 2 or names[0] == names[1]:
            raise ValueError(f"ESMM needs two distinct task names, got {names}")
        self.task_names = check_heads({names[0]: ctr_tower, names[1]: cvr_tower}, "towers")
        self.ctr_name, self.ctcvr_name = names
        self.encoder = encoder
        self.ctr_tower = ctr_tower
        self.cvr_tower = cvr_tower
        self.last_pcvr: Tensor | None = None

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        h = self.encoder(x)
        return pack([h, self.ctr_tower(h)])

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        h, ctr_logit = unpack(features, ctx)
        p_ctr = torch.sigmoid(ctr_logit)
        out = {}
        if self.ctr_name in tasks:
            out[self.ctr_name] = p_ctr
        if self.ctcvr_name in tasks:
            p_cvr = torch.sigmoid(self.cvr_tower(h))
            out[self.ctcvr_name] = p_ctr * p_cvr
            self.last_pcvr = p_cvr.detach()
        return out, None, {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(unique_params(self.encoder, self.ctr_tower))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self.cvr_tower if task == self.ctcvr_name else None))

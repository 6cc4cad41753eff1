"""Domain models following the model contract (:class:`~polytask.architectures.MultiTaskModel`).

* :class:`MPNN` -- Gilmer et al.'s message-passing network on 3-D molecular graphs (QM9).
* :class:`SegNet`, :class:`SegNetMTAN` -- SegNet encoder-decoder, hard sharing or with MTAN's
  attention (NYUv2, Cityscapes).
* :class:`CelebANet` -- FAMO's 9-layer CelebA network with a logit per attribute.
"""

from .celeba import CelebANet
from .mpnn import MPNN, GaussianRBF, to_dense
from .segnet import DENSE_KINDS, SegNet, SegNetMTAN

__all__ = ["DENSE_KINDS", "MPNN", "CelebANet", "GaussianRBF", "SegNet", "SegNetMTAN", "to_dense"]

"""Domain models that follow polytask's model contract (:class:`~polytask.architectures.MultiTaskModel`).

* :class:`MPNN` -- Gilmer et al.'s message-passing network on 3-D molecular graphs (QM9).
"""

from .mpnn import MPNN, GaussianRBF, to_dense

__all__ = ["MPNN", "GaussianRBF", "to_dense"]

"""A message-passing network over 3-D molecular graphs (Gilmer et al. 2017), in plain PyTorch.

Gilmer, Schoenholz, Riley, Vinyals & Dahl, "Neural Message Passing for Quantum Chemistry",
ICML 2017: edge-network messages, GRU updates, Set2Set readout. The multi-task QM9 benchmark of
Navon et al. (Nash-MTL, ICML 2022; also used by FAMO and LibMTL) uses this network through
PyTorch Geometric's ``NNConv`` example: node width 64, edge network
``Linear(edge_dim, 128) -> ReLU -> Linear(128, 64 * 64)``, mean aggregation over a fully connected
graph, three rounds of one shared ``NNConv`` + ``GRU``, ``Set2Set`` with three processing steps,
``Linear(128, 64) -> ReLU`` to the shared representation and one linear head per target.

Differences from that setup, all forced by the data available here (atomic numbers and 3-D
coordinates only, no RDKit bond perception):

* atoms are embedded by atomic number (``nn.Embedding``) instead of 11 chemical node features;
* edge features are a Gaussian radial basis of the interatomic distance (``n_rbf`` centres on
  ``[0, rbf_max]`` Angstrom, width = spacing) instead of bond-type one-hots plus distance.

Everything runs on padded per-molecule blocks ``[B, N_max, ...]`` with masks, so molecules in a
batch never interact, there is no scatter, and every operation has a batching rule (the engine's
batched per-task backward needs one). The edge network is applied exactly but without
materialising one ``dim x dim`` matrix per edge: with ``phi_ij = ReLU(W1 rbf(d_ij) + b1)``
(``[hidden]``) the edge matrix is ``A_ij = reshape(W2 phi_ij + b2)``, so the mean message
``sum_j h_j A_ij / deg_i`` is computed as ``(sum_j phi_ij h_j) W2 + (sum_j h_j) b2`` contracted
per molecule: ``O(E * hidden * dim)`` work instead of ``O(E * hidden * dim^2)``. GRU and LSTM cells
are written with ``nn.Linear`` layers (PyTorch's gate equations) so that the engine's fast exact
path can capture them.

Inputs: the collated QM9 batch of :func:`polytask.data.collate_graphs` (a dict with ``z`` int64
``[A]``, ``pos`` float ``[A, 3]`` in Angstrom, ``batch`` int64 ``[A]`` and optionally ``ptr``
``[B+1]``); use ``TrainerConfig(input_key=["z", "pos", "batch", "ptr"])``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..architectures import MultiTaskModel

__all__ = ["MPNN", "GaussianRBF", "to_dense"]


def to_dense(
    z: Tensor, pos: Tensor, batch: Tensor | None = None, ptr: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad flat atoms to per-molecule blocks: ``z [B, N]`` (0 = padding), ``pos [B, N, 3]``, mask.

    ``batch`` gives the molecule of each atom (atoms of one molecule contiguous and molecules in
    order, as :func:`~polytask.data.collate_graphs` makes them); without it all atoms form one
    molecule. ``ptr`` (offsets ``[B+1]``) is derived from ``batch`` when absent.
    """
    if z.ndim != 1 or pos.shape != (z.shape[0], 3):
        raise ValueError(
            f"expected z [A] and pos [A, 3], got {tuple(z.shape)} and {tuple(pos.shape)}"
        )
    if batch is None:
        batch = torch.zeros_like(z, dtype=torch.long)
    batch = batch.long()
    if ptr is None:
        counts = torch.bincount(batch)
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    ptr = ptr.to(z.device).long()
    counts = ptr[1:] - ptr[:-1]
    n_mol = counts.shape[0]
    n_max = int(counts.max()) if n_mol else 0
    slot = torch.arange(z.shape[0], device=z.device) - ptr[batch]
    zd = z.new_zeros((n_mol, n_max), dtype=torch.long)
    pd = pos.new_zeros((n_mol, n_max, 3))
    zd[batch, slot] = z.long()
    pd[batch, slot] = pos
    mask = torch.zeros((n_mol, n_max), dtype=torch.bool, device=z.device)
    mask[batch, slot] = True
    return zd, pd, mask


class GaussianRBF(nn.Module):
    """``exp(-0.5 ((d - mu_k) / sigma)^2)`` for ``n`` centres ``mu_k`` evenly on ``[0, d_max]``."""

    def __init__(self, n: int = 32, d_max: float = 8.0) -> None:
        super().__init__()
        if n < 2:
            raise ValueError("GaussianRBF needs at least 2 centres")
        self.register_buffer("centres", torch.linspace(0.0, d_max, n))
        self.sigma = d_max / (n - 1)

    def forward(self, d: Tensor) -> Tensor:
        return torch.exp(-0.5 * ((d.unsqueeze(-1) - self.centres) / self.sigma) ** 2)


class _GRUCell(nn.Module):
    """``torch.nn.GRUCell``'s equations from two linear layers (gate order r, z, n)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(dim, 3 * dim)
        self.lin_h = nn.Linear(dim, 3 * dim)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        xr, xz, xn = self.lin_x(x).chunk(3, dim=-1)
        hr, hz, hn = self.lin_h(h).chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h


class _LSTMCell(nn.Module):
    """``torch.nn.LSTMCell``'s equations from two linear layers (gate order i, f, g, o)."""

    def __init__(self, d_in: int, dim: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(d_in, 4 * dim)
        self.lin_h = nn.Linear(dim, 4 * dim)

    def forward(self, x: Tensor, hc: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = hc
        i, f, g, o = (self.lin_x(x) + self.lin_h(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class _Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al. 2016) over the atoms of each molecule (masked)."""

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.steps = steps
        self.lstm = _LSTMCell(2 * dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b = x.shape[0]
        h = x.new_zeros(b, self.dim)
        c = x.new_zeros(b, self.dim)
        q_star = x.new_zeros(b, 2 * self.dim)
        neg = torch.finfo(x.dtype).min
        for _ in range(self.steps):
            h, c = self.lstm(q_star, (h, c))
            e = (x * h.unsqueeze(1)).sum(-1).masked_fill(~mask, neg)  # [B, N]
            a = torch.softmax(e, dim=1) * mask
            r = (a.unsqueeze(-1) * x).sum(1)
            q_star = torch.cat([h, r], dim=-1)
        return q_star


class _EdgeConv(nn.Module):
    """Gilmer's edge network (PyG ``NNConv``, mean aggregation, root weight and bias), exact.

    ``m_i = mean_{j in N(i)} h_j A(e_ij) + h_i R + c`` with ``A(e) = reshape(W2 phi(e) + b2)``.
    """

    def __init__(self, dim: int, n_edge: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.edge_in = nn.Linear(n_edge, hidden)  # phi = ReLU(edge_in(rbf))
        # second edge-network layer Linear(hidden, dim * dim), stored as [in, hidden, out] so
        # that the per-edge matrices are never formed
        self.edge_weight = nn.Parameter(torch.empty(dim, hidden, dim))
        self.edge_bias = nn.Parameter(torch.empty(dim, dim))  # [in, out]
        self.root = nn.Linear(dim, dim)  # h_i R + c
        bound = 1.0 / hidden**0.5  # nn.Linear(hidden, dim * dim)'s default initialisation
        nn.init.uniform_(self.edge_weight, -bound, bound)
        nn.init.uniform_(self.edge_bias, -bound, bound)

    def phi(self, rbf: Tensor) -> Tensor:
        return torch.relu(self.edge_in(rbf))

    def forward(self, h: Tensor, phi: Tensor, adj: Tensor) -> Tensor:
        """``h [B, N, D]``, ``phi [B, N, N, H]``, ``adj [B, N, N]`` (float, row-normalised)."""
        b, n, d = h.shape
        k = self.hidden
        # u[b, j, k, o] = sum_c h[b, j, c] W[c, k, o]
        u = (h.reshape(b * n, d) @ self.edge_weight.reshape(d, k * d)).view(b, n * k, d)
        # msg[b, i, o] = sum_{j, k} adj_ij phi_ijk u[b, j, k, o]
        msg = torch.bmm((phi * adj.unsqueeze(-1)).reshape(b, n, n * k), u)
        msg = msg + torch.bmm(adj, h) @ self.edge_bias
        return msg + self.root(h)


class MPNN(MultiTaskModel):
    """Gilmer et al.'s MPNN (edge network + GRU + Set2Set) with one linear head per task.

    Args:
        task_names: one scalar regression head per name (default the 11 QM9 targets).
        dim: node / representation width (literature: 64).
        edge_hidden: hidden width of the edge network (literature: 128).
        n_rbf: Gaussian radial-basis features of the distance.
        rbf_max: largest RBF centre (Angstrom).
        cutoff: connect atoms closer than this (Angstrom); ``None``: every pair of a molecule
            (the literature's "complete graph").
        steps: message-passing rounds (one shared edge network and GRU, as in the reference).
        readout: ``"set2set"`` (3 processing steps), ``"sum"`` or ``"mean"``.
        max_z: largest atomic number embedded.

    Example:
        >>> import torch
        >>> m = MPNN(["a", "b"], dim=8, edge_hidden=8, n_rbf=4)
        >>> batch = {"z": torch.tensor([6, 1, 1, 8, 1]), "pos": torch.randn(5, 3),
        ...          "batch": torch.tensor([0, 0, 0, 1, 1])}
        >>> {k: tuple(v.shape) for k, v in m(batch).items()}
        {'a': (2, 1), 'b': (2, 1)}
    """

    def __init__(
        self,
        task_names: Sequence[str] | None = None,
        *,
        dim: int = 64,
        edge_hidden: int = 128,
        n_rbf: int = 32,
        rbf_max: float = 8.0,
        cutoff: float | None = None,
        steps: int = 3,
        readout: str = "set2set",
        max_z: int = 10,
    ) -> None:
        super().__init__()
        if task_names is None:
            task_names = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
        self.task_names = list(task_names)
        if not self.task_names or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names must be unique and non-empty, got {self.task_names}")
        if readout not in ("set2set", "sum", "mean"):
            raise ValueError(f"readout must be 'set2set', 'sum' or 'mean', got {readout!r}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.dim = dim
        self.cutoff = cutoff
        self.steps = steps
        self.readout = readout
        self.embed = nn.Embedding(max_z + 1, dim, padding_idx=0)
        self.rbf = GaussianRBF(n_rbf, rbf_max)
        self.conv = _EdgeConv(dim, n_rbf, edge_hidden)
        self.gru = _GRUCell(dim)
        if readout == "set2set":
            self.set2set: _Set2Set | None = _Set2Set(dim, steps=3)
            self.lin1 = nn.Linear(2 * dim, dim)
        else:
            self.set2set = None
            self.lin1 = nn.Linear(dim, dim)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 1) for t in self.task_names})

    # ------------------------------------------------------------------ model contract
    def encode(self, x: Any) -> Tensor:
        """Per-molecule shared representation ``[B, dim]`` of a collated graph batch."""
        if not isinstance(x, Mapping):
            raise TypeError(
                "MPNN takes the collated graph dict {'z', 'pos', 'batch'[, 'ptr']}; set "
                "TrainerConfig(input_key=['z', 'pos', 'batch', 'ptr'])"
            )
        z, pos, mask = to_dense(x["z"], x["pos"], x.get("batch"), x.get("ptr"))
        if int(z.max()) >= self.embed.num_embeddings:
            raise ValueError(
                f"atomic number {int(z.max())} > max_z={self.embed.num_embeddings - 1}"
            )
        pos = pos.to(self.embed.weight.dtype)
        pair = mask.unsqueeze(1) & mask.unsqueeze(2)
        pair = pair & ~torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
        diff = pos.unsqueeze(2) - pos.unsqueeze(1)
        dist = torch.sqrt((diff * diff).sum(-1).clamp_min(1e-12))  # [B, N, N]
        if self.cutoff is not None:
            pair = pair & (dist < self.cutoff)
        adj = pair.to(pos.dtype)
        adj = adj / adj.sum(-1, keepdim=True).clamp_min(1.0)  # mean aggregation
        phi = self.conv.phi(self.rbf(dist))  # [B, N, N, H]
        fmask = mask.unsqueeze(-1).to(pos.dtype)
        h = self.embed(z) * fmask
        for _ in range(self.steps):
            m = torch.relu(self.conv(h, phi, adj))
            h = self.gru(m, h) * fmask
        if self.set2set is not None:
            pooled = self.set2set(h, mask)
        elif self.readout == "sum":
            pooled = h.sum(1)
        else:
            pooled = h.sum(1) / fmask.sum(1).clamp_min(1.0)
        return torch.relu(self.lin1(pooled))

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        return {t: head(features) for t, head in self.heads.items()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if not name.startswith("heads."):
                yield p

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return self.heads[task].parameters()

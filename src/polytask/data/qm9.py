"""QM9: 11 quantum-chemical regression tasks on 130,831 small organic molecules.

Data: Ramakrishnan, Dral, Rupp & von Lilienfeld, 2014, "Quantum chemistry
structures and properties of 134 kilo molecules", Scientific Data 1:140022
(original release on figshare, https://doi.org/10.6084/m9.figshare.c.978904;
the 3,054 molecules that failed the consistency check are already removed).
Here from the CSV files of PyPI ``qm9pack==1.0.3``
(https://github.com/raghurama123/qm9pack, MIT licence).

Tasks: the 11 targets used in the multi-task literature (e.g. Navon et al.,
2022, "Multi-Task Learning as a Bargaining Game"): ``mu, alpha, homo, lumo,
r2, zpve, U0, U, H, G, cv``.  With ``energy_unit="eV"`` (default) the energies
(homo, lumo, zpve, U0, U, H, G) are converted from Hartree to eV as in
PyTorch Geometric's QM9; ``mu`` is in Debye, ``alpha`` in bohr^3, ``r2`` in
bohr^2 and ``cv`` in cal/(mol K).  Targets are standardised with training
statistics; :meth:`MultiTaskData.unstandardize` (``target_stats``) maps
predictions back to these units to report MAE.

Two input forms:

* ``form="graph"``: samples ``{"z": int64 [N], "pos": float32 [N,3] (Angstrom),
  <task>: float32}``; batch them with :func:`collate_graphs`.
* ``form="features"``: samples ``{"x": float32 [34], <task>: float32}`` where x
  is the 29 sorted Coulomb-matrix eigenvalues (Rupp et al., 2012, PRL
  108:058301; zero-padded to 29 atoms, atomic units) plus the counts of H, C,
  N, O, F, standardised with training statistics.

The three CSV files (225 MB) are parsed once; the parsed tensors are cached
with :func:`torch.save` next to them (``qm9pack-1.0.3/qm9_parsed_v1.pt``), after
which the CSVs are no longer needed.  The feature form of large subsets
(>= 20,000 molecules) likewise computes the features of all molecules once and
caches them (``qm9_coulomb_features_v1.pt``, 18 MB).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ._fetch import cache_dir, fetch
from .base import DictDataset, MultiTaskData, TaskSpec, check_size, fit_standardizer
from .resources import QM9_PARTS

__all__ = [
    "ELEMENTS",
    "HARTREE_TO_EV",
    "MAX_ATOMS",
    "QM9_TARGETS",
    "QM9GraphDataset",
    "collate_graphs",
    "coulomb_features",
    "load_qm9_arrays",
    "load_qm9_features",
    "qm9",
]

log = logging.getLogger(__name__)

HARTREE_TO_EV = 27.211386246
ANGSTROM_TO_BOHR = 1.0 / 0.52917721092
MAX_ATOMS = 29
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

#: task name -> (CSV column, unit in the CSV, is an energy in Hartree)
QM9_TARGETS: dict[str, tuple[str, str, bool]] = {
    "mu": ("Dipole_debye", "D", False),
    "alpha": ("Polarizability_bohr3", "bohr^3", False),
    "homo": ("HOMO_au", "Ha", True),
    "lumo": ("LUMO_au", "Ha", True),
    "r2": ("R2_bohr2", "bohr^2", False),
    "zpve": ("ZPVE_au", "Ha", True),
    "U0": ("InternalEnergy_0K_au", "Ha", True),
    "U": ("InternalEnergy_298K_au", "Ha", True),
    "H": ("Enthalphy_298K_au", "Ha", True),  # (sic) column name in qm9pack
    "G": ("GibbsFreeEnergy_298K_au", "Ha", True),
    "cv": ("Heatcapacity_Cv_cal_mol_K", "cal/mol/K", False),
}

QM9_SOURCE = (
    "QM9 (Ramakrishnan et al. 2014, Sci. Data 1:140022, "
    "https://doi.org/10.6084/m9.figshare.c.978904); "
    "CSV files from PyPI qm9pack==1.0.3 (https://github.com/raghurama123/qm9pack, MIT licence)"
)
_PARSED_VERSION = 1
_PARSED_FILE = "qm9pack-1.0.3/qm9_parsed_v1.pt"


# --------------------------------------------------------------------------- parsing


def _numbers(strings: Sequence[str]) -> np.ndarray:
    """All numbers in nested-list strings like ``"[[0.1,2.],[3,4e-2]]"``, flattened."""
    joined = ",".join(strings).replace("[", "").replace("]", "")
    return np.array(joined.split(","), dtype=np.float64)


def _parse_csvs(paths: Sequence[Path]) -> dict[str, Any]:
    try:
        import pyarrow.csv as pacsv
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("parsing the QM9 CSV files needs pyarrow: pip install pyarrow") from exc
    columns = ["Index", "N_atoms", "Elements", "XYZ_Ang"] + [c for c, _, _ in QM9_TARGETS.values()]
    index, n_atoms, symbols, coords, targets = [], [], [], [], []
    for path in paths:
        log.info("parsing %s", path)
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=columns))
        index.append(table.column("Index").to_numpy().astype(np.int64))
        counts = table.column("N_atoms").to_numpy().astype(np.int64)
        n_atoms.append(counts)
        elements = ",".join(table.column("Elements").to_pylist())
        symbols.append(np.array(elements.translate(str.maketrans("", "", "[]' ")).split(",")))
        xyz = _numbers(table.column("XYZ_Ang").to_pylist())
        if xyz.size != 3 * counts.sum():
            raise ValueError(f"{path}: {xyz.size} coordinates for {counts.sum()} atoms")
        coords.append(xyz.reshape(-1, 3))
        targets.append(
            np.stack(
                [table.column(c).to_numpy().astype(np.float64) for c, _, _ in QM9_TARGETS.values()],
                1,
            )
        )
    counts = np.concatenate(n_atoms)
    sym = np.concatenate(symbols)
    if sym.size != counts.sum():
        raise ValueError(f"{sym.size} element symbols for {counts.sum()} atoms")
    unknown = set(np.unique(sym)) - set(ELEMENTS)
    if unknown:
        raise ValueError(f"unexpected elements in QM9: {sorted(unknown)}")
    z = np.zeros(sym.size, dtype=np.int8)
    for s, number in ELEMENTS.items():
        z[sym == s] = number
    pos = np.concatenate(coords).astype(np.float32)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    idx = np.concatenate(index)
    y = np.concatenate(targets)
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(order, np.arange(len(idx))):  # make the order canonical
        atom_order = np.concatenate([np.arange(ptr[i], ptr[i + 1]) for i in order])
        z, pos, counts, idx, y = z[atom_order], pos[atom_order], counts[order], idx[order], y[order]
        ptr = np.concatenate([[0], np.cumsum(counts)])
    if counts.max() > MAX_ATOMS:
        raise ValueError(f"molecule with {counts.max()} atoms (> {MAX_ATOMS})")
    return {
        "version": _PARSED_VERSION,
        "source_sha256": [r.sha256 for r in QM9_PARTS],
        "z": torch.from_numpy(z),
        "pos": torch.from_numpy(pos),
        "ptr": torch.from_numpy(ptr.astype(np.int64)),
        "index": torch.from_numpy(idx),
        "targets": torch.from_numpy(y),
        "target_names": list(QM9_TARGETS),
    }


def load_qm9_arrays() -> dict[str, Any]:
    """All 130,831 molecules as flat tensors (CSV units), parsed once and cached.

    Keys: ``z`` int8 [A], ``pos`` float32 [A,3] (Angstrom), ``ptr`` int64 [M+1]
    (atoms of molecule i are ``ptr[i]:ptr[i+1]``), ``index`` int64 [M] (QM9 id),
    ``targets`` float64 [M, 11] in the CSV units, ``target_names``.
    """
    cached = cache_dir() / _PARSED_FILE
    if cached.is_file():
        try:
            data = torch.load(cached, weights_only=True)
            if data.get("version") == _PARSED_VERSION and data.get("source_sha256") == [
                r.sha256 for r in QM9_PARTS
            ]:
                return data
            log.info("stale QM9 parse cache %s; re-parsing", cached)
        except Exception as exc:
            log.warning("unreadable QM9 parse cache %s (%s); re-parsing", cached, exc)
    paths = [fetch(r) for r in QM9_PARTS]
    data = _parse_csvs(paths)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, cached)
    return data


# --------------------------------------------------------------------------- features


def coulomb_features(
    z: torch.Tensor, pos: torch.Tensor, ptr: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Per-molecule features: 29 Coulomb-matrix eigenvalues + counts of H, C, N, O, F.

    Coulomb matrix (Rupp et al. 2012): ``C_ii = 0.5 Z_i^2.4``,
    ``C_ij = Z_i Z_j / |R_i - R_j|`` with R in bohr; eigenvalues sorted by
    decreasing absolute value and zero-padded to 29 (padding atoms have Z=0,
    so their rows and columns are zero).  Computed in float32, in chunks of
    ``chunk`` molecules.  Returns float32 ``[M, 34]``.
    """
    counts = (ptr[1:] - ptr[:-1]).long()
    m = len(counts)
    if counts.numel() and int(counts.max()) > MAX_ATOMS:
        raise ValueError(f"molecule with more than {MAX_ATOMS} atoms")
    mol = torch.repeat_interleave(torch.arange(m), counts)
    slot = torch.arange(len(z)) - ptr[:-1].long()[mol]
    zf = torch.zeros(m, MAX_ATOMS)
    rf = torch.zeros(m, MAX_ATOMS, 3)
    zf[mol, slot] = z.float()
    rf[mol, slot] = pos.float() * ANGSTROM_TO_BOHR
    out = torch.zeros(m, MAX_ATOMS + len(ELEMENTS))
    diag = torch.arange(MAX_ATOMS)
    for s in range(0, m, chunk):
        zc, rc = zf[s : s + chunk], rf[s : s + chunk]
        dist = (rc[:, :, None] - rc[:, None]).norm(dim=-1)
        cm = zc[:, :, None] * zc[:, None, :] / dist.clamp_min(1e-6)
        cm[:, diag, diag] = 0.5 * zc.pow(2.4)
        eig = torch.linalg.eigvalsh(cm)
        out[s : s + chunk, :MAX_ATOMS] = torch.gather(
            eig, 1, eig.abs().argsort(dim=1, descending=True)
        )
    composition = torch.zeros(m, 10)
    composition.index_put_((mol, z.long()), torch.ones(len(z)), accumulate=True)
    out[:, MAX_ATOMS:] = composition[:, list(ELEMENTS.values())]
    return out


_FEATURES_FILE = "qm9pack-1.0.3/qm9_coulomb_features_v1.pt"
#: Subsets at least this large use (and if needed build) the cached features of all molecules.
FEATURE_CACHE_MIN = 20_000


def load_qm9_features(data: dict[str, Any] | None = None) -> torch.Tensor:
    """:func:`coulomb_features` of all molecules (float32 [130831, 34]), computed once, cached."""
    path = cache_dir() / _FEATURES_FILE
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("version") == _PARSED_VERSION and cached.get("source_sha256") == [
                r.sha256 for r in QM9_PARTS
            ]:
                return cached["features"]
        except Exception as exc:
            log.warning("unreadable QM9 feature cache %s (%s); recomputing", path, exc)
    data = data if data is not None else load_qm9_arrays()
    log.info("computing Coulomb-matrix features of all QM9 molecules (once)")
    feats = coulomb_features(data["z"], data["pos"], data["ptr"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {"version": _PARSED_VERSION, "source_sha256": data["source_sha256"], "features": feats}, tmp
    )
    os.replace(tmp, path)
    return feats


# --------------------------------------------------------------------------- datasets


class QM9GraphDataset(Dataset[dict[str, torch.Tensor]]):
    """Molecules as variable-size graphs.

    Samples: ``{"z": int64 [N], "pos": float32 [N,3], <task>: float32}``.

    ``molecules`` are row numbers into the flat arrays; ``targets`` maps task
    name to a float32 tensor aligned with ``molecules``.
    """

    def __init__(
        self,
        z: torch.Tensor,
        pos: torch.Tensor,
        ptr: torch.Tensor,
        molecules: torch.Tensor,
        targets: dict[str, torch.Tensor],
    ) -> None:
        self.z, self.pos, self.ptr = z, pos, ptr
        self.molecules = molecules
        self.targets = targets

    def __len__(self) -> int:
        return len(self.molecules)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        m = int(self.molecules[index])
        a, b = int(self.ptr[m]), int(self.ptr[m + 1])
        sample = {"z": self.z[a:b].long(), "pos": self.pos[a:b]}
        sample.update({k: v[index] for k, v in self.targets.items()})
        return sample


NODE_KEYS = ("z", "pos")


def collate_graphs(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch graph samples without padding.

    Node-level entries (``z``, ``pos``) are concatenated; every other entry is
    stacked.  Adds ``batch`` (int64 [total atoms], the molecule of each atom),
    ``ptr`` (int64 [B+1] offsets) and ``num_graphs`` (int64 scalar tensor).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    counts = torch.tensor([len(s["z"]) for s in samples], dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.cat(values) if key in NODE_KEYS else torch.stack(values)
    out["batch"] = torch.repeat_interleave(torch.arange(len(samples)), counts)
    out["ptr"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    out["num_graphs"] = torch.tensor(len(samples))
    return out


def qm9(
    n_molecules: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    form: Literal["graph", "features"] = "graph",
    energy_unit: Literal["eV", "hartree"] = "eV",
    tasks: Sequence[str] | None = None,
) -> MultiTaskData:
    """QM9 multi-task regression (11 tasks by default).

    ``n_molecules`` picks a fixed random subset (a permutation drawn from
    ``seed``; ``None`` = all 130,831).  The subset is split into test
    (``n_test``, default 10%), val (``n_val``, default 10%) and train (the
    rest, or the first ``n_train`` of it).  ``form`` selects graph samples
    (use ``MultiTaskData.collate_fn``) or fixed-size Coulomb/composition
    feature vectors.  ``tasks`` restricts the targets (names from
    :data:`QM9_TARGETS`).
    """
    if form not in ("graph", "features"):
        raise ValueError(f"form must be 'graph' or 'features', got {form!r}")
    if energy_unit not in ("eV", "hartree"):
        raise ValueError(f"energy_unit must be 'eV' or 'hartree', got {energy_unit!r}")
    names = list(tasks) if tasks is not None else list(QM9_TARGETS)
    unknown = [t for t in names if t not in QM9_TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown QM9 tasks {unknown}; choose from {list(QM9_TARGETS)}")

    data = load_qm9_arrays()
    ptr: torch.Tensor = data["ptr"]
    total = len(ptr) - 1
    m = check_size("n_molecules", n_molecules, total)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(total))[:m]
    n_te = check_size("n_test", n_test if n_test is not None else round(0.1 * m), m)
    n_va = check_size("n_val", n_val if n_val is not None else round(0.1 * m), m - n_te)
    n_tr = check_size("n_train", n_train, m - n_te - n_va)
    split_rows = [perm[n_te + n_va :][:n_tr], perm[n_te : n_te + n_va], perm[:n_te]]

    columns = [list(QM9_TARGETS).index(t) for t in names]
    y_all = data["targets"][:, columns].clone()
    scale = torch.tensor(
        [HARTREE_TO_EV if (QM9_TARGETS[t][2] and energy_unit == "eV") else 1.0 for t in names]
    )
    y_all *= scale.double()
    y_mean, y_std = fit_standardizer(y_all[split_rows[0]].numpy())
    y_std_all = (y_all - torch.from_numpy(y_mean)) / torch.from_numpy(y_std)

    def targets(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: y_std_all[rows, j].float().contiguous() for j, t in enumerate(names)}

    units = {
        t: ("eV" if QM9_TARGETS[t][2] and energy_unit == "eV" else QM9_TARGETS[t][1]) for t in names
    }
    extras: dict[str, Any] = {
        "units": units,
        "molecule_rows": dict(zip(("train", "val", "test"), split_rows, strict=True)),
    }
    if form == "graph":
        splits: list[Dataset[Any]] = [
            QM9GraphDataset(data["z"], data["pos"], ptr, rows, targets(rows)) for rows in split_rows
        ]
        input_shape = None
        collate = collate_graphs
    else:
        splits, extras["feature_names"] = _feature_splits(data, split_rows, targets)
        input_shape = (len(extras["feature_names"]),)
        collate = None
    return MultiTaskData(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[TaskSpec(t, "regression") for t in names],
        input_shape=input_shape,
        description=(
            f"QM9: {len(names)} molecular property regressions on "
            f"{m} molecules ({form} inputs); targets standardised with train statistics."
        ),
        source=QM9_SOURCE,
        collate_fn=collate,
        target_stats={t: (float(y_mean[j]), float(y_std[j])) for j, t in enumerate(names)},
        extras=extras,
    )


def _feature_splits(
    data: dict[str, Any], split_rows: list[torch.Tensor], targets: Any
) -> tuple[list[Dataset[Any]], list[str]]:
    ptr: torch.Tensor = data["ptr"]
    rows_all = torch.cat(split_rows)
    # The choice depends only on the arguments, so results never depend on the cache state
    # (the two paths agree to ~1e-4: float32 eigenvalues computed in different batches).
    if len(rows_all) >= FEATURE_CACHE_MIN:
        feats = load_qm9_features(data)[rows_all]
    else:  # small subset: cheaper to compute directly
        counts = ptr[rows_all + 1] - ptr[rows_all]
        atom_idx = torch.repeat_interleave(ptr[rows_all], counts) + (
            torch.arange(int(counts.sum()))
            - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        )
        sub_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        feats = coulomb_features(data["z"][atom_idx], data["pos"][atom_idx], sub_ptr)
    bounds = np.cumsum([0] + [len(r) for r in split_rows])
    mean, std = fit_standardizer(feats[: bounds[1]].double().numpy())
    feats = ((feats.double() - torch.from_numpy(mean)) / torch.from_numpy(std)).float()
    splits: list[Dataset[Any]] = [
        DictDataset(
            {"x": feats[bounds[i] : bounds[i + 1]].contiguous(), **targets(rows)},
            meta={"row": rows},
        )
        for i, rows in enumerate(split_rows)
    ]
    names = [f"cm_eig_{i}" for i in range(MAX_ATOMS)] + [f"n_{s}" for s in ELEMENTS]
    return splits, names

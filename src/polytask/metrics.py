"""Multi-task summary metrics: Δm% against single-task baselines and mean rank across methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["delta_m", "mean_rank"]


def delta_m(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Δm% of a multi-task model against single-task baselines (Maninis et al., CVPR 2019).

    ``Δm = 100/M * sum_j (-1)^{h_j} (M_j - B_j) / B_j`` over all ``M`` metrics, with ``h_j = 1``
    when higher is better. Lower is better; negative means better than the baselines.

    >>> round(delta_m({"a/acc": 0.9, "b/mae": 2.0}, {"a/acc": 1.0, "b/mae": 1.0},
    ...               {"a/acc": True, "b/mae": False}), 6)  # (+10% + 100%) / 2
    55.0
    """
    keys = list(higher_is_better)
    if not keys:
        raise ValueError("delta_m needs at least one metric")
    missing = [k for k in keys if k not in results or k not in baseline]
    if missing:
        raise KeyError(f"delta_m: metrics {missing} missing from the results or the baseline")
    total = 0.0
    for k in keys:
        base = float(baseline[k])
        if base == 0.0:
            raise ZeroDivisionError(f"delta_m: baseline of {k!r} is 0; Δm is undefined")
        sign = -1.0 if higher_is_better[k] else 1.0
        total += sign * (float(results[k]) - base) / abs(base)
    return 100.0 * total / len(keys)


def mean_rank(
    table: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
) -> dict[str, float]:
    """Mean rank of each method over all metrics (1 = best; ties share the average rank).

    Args:
        table: ``{method: {metric: value}}``.
        higher_is_better: ``{metric: bool}`` for the metrics to rank on.

    >>> mean_rank({"a": {"x": 1.0, "y": 3.0}, "b": {"x": 2.0, "y": 1.0}}, {"x": True, "y": False})
    {'a': 2.0, 'b': 1.0}
    """
    methods: Sequence[str] = list(table)
    ranks = {m: 0.0 for m in methods}
    for metric, hib in higher_is_better.items():
        vals = {m: float(table[m][metric]) for m in methods}
        for m in methods:
            better = sum(1 for o in methods if (vals[o] > vals[m] if hib else vals[o] < vals[m]))
            ties = sum(1 for o in methods if vals[o] == vals[m]) - 1
            ranks[m] += 1 + better + ties / 2
    n = len(higher_is_better)
    return {m: r / n for m, r in ranks.items()}

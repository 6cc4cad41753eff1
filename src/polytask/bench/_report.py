"""Reports of a suite's results: ``report.md`` and a self-contained ``report.html``.

Both are rendered from one list of blocks, so they say the same things: the protocol, the table
(per-task metrics mean ± s.e., Δm%, mean rank, s/epoch, peak MB), published numbers where
``/shared/references.md`` has some for the suite's data, and plots (PNG files under ``plots/``,
embedded in the HTML as base64 data URIs). matplotlib is imported only here, lazily, and drawn
through its Agg canvas without touching the global backend.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._suite import Protocol, Published, RunResult, Suite

__all__ = ["REFERENCE_TABLES", "format_table", "write_report"]

STL = "stl"

# Published Δm% (lower is better) from /shared/references.md, keyed by suite name; polytask method
# names ("mean" stands for LS, equal weights). A suite's own ``published()`` takes precedence and
# says whether its protocol matches; these are shown as context otherwise.
REFERENCE_TABLES: dict[str, list[Published]] = {
    "qm9": [
        Published(
            source="Navon et al., Nash-MTL, ICML 2022, Table 1 (3 seeds, mean ± s.e.)",
            protocol="QM9, 11 targets, message-passing network on the 3-D molecular graph, "
            "300 epochs, the original learning-rate schedule",
            matches=False,
            note="the polytask QM9 suite does not train that model for 300 epochs",
            delta_m={
                "mean": 177.6,
                "si": 77.8,
                "rlw": 203.8,
                "dwa": 175.3,
                "uw": 108.0,
                "mgda": 120.5,
                "pcgrad": 125.7,
                "cagrad": 112.8,
                "imtl_g": 77.2,
                "nash_mtl": 62.0,
            },
            delta_m_se={
                "mean": 3.4,
                "si": 9.2,
                "rlw": 3.4,
                "dwa": 6.3,
                "uw": 22.5,
                "mgda": 2.0,
                "pcgrad": 10.3,
                "cagrad": 4.0,
                "imtl_g": 9.3,
                "nash_mtl": 1.4,
            },
        ),
        Published(
            source="NTKMTL paper, Table 3 (learning-rate schedule fixed, STL re-trained)",
            protocol="QM9, 11 targets, message-passing network, 300 epochs, fixed schedule",
            matches=False,
            note="the polytask QM9 suite does not train that model for 300 epochs",
            delta_m={
                "mean": 179.8,
                "si": 39.7,
                "rlw": 222.6,
                "dwa": 173.0,
                "uw": 58.4,
                "mgda": 101.4,
                "pcgrad": 118.6,
                "cagrad": 102.4,
                "nash_mtl": 72.9,
                "famo": 38.9,
                "fairgrad": 57.0,
                "go4align": 40.5,
                "ntkmtl": 56.7,
                "ntkmtl_sr": 30.7,
            },
        ),
    ],
}


_VISION_NOTE = (
    "the model, optimiser, schedule, epochs, losses and augmentation are the published ones, but "
    "polytask selects the epoch on held-out validation data (10 % of the training images) and "
    "pools the metrics over all test pixels, where the papers train on every training image and "
    "report test metrics of the last epochs"
)
REFERENCE_TABLES["nyuv2"] = [
    Published(
        source="Navon et al., Nash-MTL, ICML 2022, Table 2 and the NTKMTL paper, Table 1 "
        "(3 seeds; STL baseline from CAGrad)",
        protocol="NYUv2 795/654 images at 288x384, SegNet-MTAN, Adam 1e-4, batch 2, StepLR(100, "
        "0.5), 200 epochs, scale-crop and flip augmentation",
        matches=False,
        note=_VISION_NOTE,
        delta_m={
            "mean": 5.59,
            "si": 4.39,
            "rlw": 7.78,
            "dwa": 3.57,
            "uw": 4.05,
            "mgda": 1.38,
            "pcgrad": 3.97,
            "graddrop": 3.58,
            "stch": -1.35,
            "go4align": -6.08,
            "ntkmtl_sr": -5.35,
            "cagrad": 0.20,
            "imtl_g": -0.76,
            "moco": 0.16,
            "nash_mtl": -4.04,
            "aligned_mtl": -3.12,
            "famo": -4.10,
            "db_mtl": -5.36,
            "fairgrad": -4.66,
            "ntkmtl": -6.99,
        },
        metrics={
            "stl": {
                "segmentation/miou": 0.3830,
                "segmentation/pix_acc": 0.6376,
                "depth/abs_err": 0.6754,
                "depth/rel_err": 0.2780,
                "normal/mean_angle": 25.01,
                "normal/median_angle": 19.21,
                "normal/within_11.25": 0.3014,
                "normal/within_22.5": 0.5720,
                "normal/within_30": 0.6915,
            }
        },
    )
]
REFERENCE_TABLES["cityscapes"] = [
    Published(
        source="Nash-MTL / FAMO / NTKMTL papers (Cityscapes 2 tasks, Δm% over mIoU, pixel "
        "accuracy, absolute and relative depth error)",
        protocol="Cityscapes 2,975/500 images at 128x256, 7 classes, SegNet-MTAN, Adam 1e-4, "
        "batch 8, StepLR(100, 0.5), 200 epochs",
        matches=False,
        note=_VISION_NOTE,
        delta_m={
            "mean": 22.60,
            "si": 14.11,
            "rlw": 24.38,
            "dwa": 21.45,
            "uw": 5.89,
            "mgda": 44.14,
            "pcgrad": 18.29,
            "graddrop": 23.73,
            "cagrad": 11.64,
            "imtl_g": 11.10,
            "nash_mtl": 6.82,
            "famo": 8.13,
            "fairgrad": 5.18,
            "ntkmtl": 1.92,
            "ntkmtl_sr": 3.84,
        },
    )
]
REFERENCE_TABLES["celeba"] = [
    Published(
        source="FAMO (Liu et al., NeurIPS 2023) and NTKMTL papers, CelebA 40 attributes, "
        "Δm% over the 40 F1 scores",
        protocol="CelebA official partition at 64x64, FAMO's 9-layer CNN, BCE, Adam 3e-4, batch "
        "256, 15 epochs, epoch selected on validation mean F1",
        matches=False,
        note="polytask selects the epoch on the validation loss instead of validation mean F1; "
        "everything else is the published protocol",
        delta_m={
            "mean": 4.15,
            "si": 7.20,
            "rlw": 1.46,
            "dwa": 3.20,
            "uw": 3.23,
            "mgda": 14.85,
            "pcgrad": 3.17,
            "cagrad": 2.48,
            "imtl_g": 0.84,
            "nash_mtl": 2.84,
            "famo": 1.21,
            "fairgrad": 0.37,
            "ntkmtl": -0.77,
            "ntkmtl_sr": 0.23,
        },
    )
]


# ------------------------------------------------------------------------------------ formatting
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pm(stat: dict[str, Any] | None, digits: int = 4, signed: bool = False) -> str:
    if not stat or not _finite(stat.get("mean")):
        return "–"  # noqa: RUF001
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stat["mean"])
    if _finite(stat.get("se")):
        text += f" ± {stat['se']:.{digits}f}"
    return text


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def _metric_digits(summary: dict[str, Any], metric: str) -> int:
    vals = [
        abs(r["metrics"][metric]["mean"])
        for r in summary["rows"].values()
        if metric in r["metrics"] and _finite(r["metrics"][metric]["mean"])
    ]
    big = max(vals, default=1.0)
    return 4 if big < 10 else 2 if big < 1000 else 1


def _table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], set[tuple[int, int]]]:
    """Header, rows and the (row, column) cells of the best method per column."""
    metrics = summary["metrics"]
    hib = summary["higher_is_better"]
    head = ["method", *(f"{m} {'↑' if hib[m] else '↓'}" for m in metrics)]
    head += ["Δm% ↓", "mean rank ↓", "s/epoch", "peak MB", "seeds"]
    rows: list[list[str]] = []
    names = list(summary["rows"])
    best: set[tuple[int, int]] = set()
    methods = [n for n in names if n != STL]
    for j, m in enumerate(metrics):
        vals = {n: summary["rows"][n]["metrics"][m]["mean"] for n in methods}
        vals = {n: v for n, v in vals.items() if _finite(v)}
        if len(vals) > 1:
            target = max(vals.values()) if hib[m] else min(vals.values())
            best |= {(names.index(n), 1 + j) for n, v in vals.items() if v == target}
    dm = {
        n: summary["rows"][n]["delta_m"]["mean"]
        for n in methods
        if summary["rows"][n].get("delta_m")
    }
    if len(dm) > 1:
        low = min(dm.values())
        best |= {(names.index(n), 1 + len(metrics)) for n, v in dm.items() if v == low}
    for n in names:
        r = summary["rows"][n]
        cells = [n]
        cells += [_pm(r["metrics"][m], _metric_digits(summary, m)) for m in metrics]
        cells.append(_pm(r.get("delta_m"), 2, signed=True) if n != STL else "0 (reference)")
        cells.append(f"{r['mean_rank']:.2f}" if "mean_rank" in r else "–")  # noqa: RUF001
        cells.append(_pm(r["time_per_epoch"], 2))
        pk = r["peak_memory_mb"]
        cells.append(f"{pk['mean']:.0f}" if _finite(pk.get("mean")) else "–")  # noqa: RUF001
        cells.append(str(len(r["seeds"])))
        rows.append(cells)
    return head, rows, best


def format_table(summary: dict[str, Any]) -> str:
    """The results table of a summary (see :func:`polytask.bench.aggregate`) as Markdown."""
    head, rows, best = _table(summary)
    return _md_table(head, rows, best)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(
    head: list[str], rows: list[list[str]], best: set[tuple[int, int]] = frozenset()
) -> str:  # type: ignore[assignment]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        cells = [f"**{_md_cell(c)}**" if (i, j) in best else _md_cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ documents
@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(
        self, head: list[str], rows: list[list[str]], best: set[tuple[int, int]] | None = None
    ) -> None:
        self.blocks.append(("table", (head, rows, best or set())))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def markdown(self, base: Path) -> str:
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append("#" * val[0] + " " + val[1])
            elif kind == "p":
                out.append(val)
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in val))
            elif kind == "table":
                out.append(_md_table(*val))
            elif kind == "code":
                out.append("```\n" + val + "\n```")
            elif kind == "img":
                path, caption = val
                rel = Path(os.path.relpath(path, base)).as_posix()
                out.append(f"![{caption}]({rel})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        body: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                body.append(f"<h{val[0]}>{e(val[1])}</h{val[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_code(e(val))}</p>")
            elif kind == "ul":
                body.append(
                    "<ul>" + "".join(f"<li>{_inline_code(e(x))}</li>" for x in val) + "</ul>"
                )
            elif kind == "table":
                head, rows, best = val
                t = [
                    "<table><thead><tr>"
                    + "".join(f"<th>{e(h)}</th>" for h in head)
                    + "</tr></thead><tbody>"
                ]
                for i, row in enumerate(rows):
                    cells = "".join(
                        f"<td><b>{e(c)}</b></td>" if (i, j) in best else f"<td>{e(c)}</td>"
                        for j, c in enumerate(row)
                    )
                    t.append(f"<tr>{cells}</tr>")
                body.append("".join(t) + "</tbody></table>")
            elif kind == "code":
                body.append(f"<pre>{e(val)}</pre>")
            elif kind == "img":
                path, caption = val
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
            "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.85em}"
            "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:0.9em}"
            "code{background:#f3f3f3;padding:0 3px}"
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )


def _inline_code(escaped: str) -> str:
    parts = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# ------------------------------------------------------------------------------------ plots
def _figure(
    n: int, width: float = 3.6, height: float = 3.0, ncols: int = 4
) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _title(fig: Any, text: str) -> None:
    width = fig.get_figwidth()
    fig.suptitle(textwrap.fill(text, max(30, int(width * 11))), fontsize=10)


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for row in r.history:
            v = row.get(key)
            if _finite(v):
                by_epoch.setdefault(int(row["epoch"]), []).append(float(v))
    xs = sorted(by_epoch)
    return xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs]


def _pareto_mask(points: list[tuple[float, float]], hib: tuple[bool, bool]) -> list[bool]:
    def better_eq(a: float, b: float, h: bool) -> bool:
        return a >= b if h else a <= b

    mask = []
    for i, p in enumerate(points):
        dominated = any(
            j != i
            and better_eq(q[0], p[0], hib[0])
            and better_eq(q[1], p[1], hib[1])
            and (q[0] != p[0] or q[1] != p[1])
            for j, q in enumerate(points)
        )
        mask.append(not dominated)
    return mask


def plot_pareto(summary: dict[str, Any], path: Path, max_pairs: int = 6) -> Path | None:
    """Scatter of the methods (mean ± s.e.) on pairs of task metrics, with the Pareto front."""
    hib = summary["higher_is_better"]
    first: dict[str, str] = {}
    for m in summary["metrics"]:
        first.setdefault(m.split("/")[0], m)  # one metric per task
    metrics = list(first.values())
    if len(metrics) < 2:
        return None
    pairs = list(itertools.combinations(metrics, 2))[:max_pairs]
    rows = summary["rows"]
    names = list(rows)
    colors = _colors([n for n in names if n != STL])
    fig, axes = _figure(len(pairs), 4.2, 3.6, ncols=3)
    for ax, (mx, my) in zip(axes, pairs, strict=False):
        pts, labels = [], []
        for n in names:
            sx, sy = rows[n]["metrics"][mx], rows[n]["metrics"][my]
            if not (_finite(sx["mean"]) and _finite(sy["mean"])):
                continue
            ex = sx["se"] if _finite(sx["se"]) else 0.0
            ey = sy["se"] if _finite(sy["se"]) else 0.0
            if n == STL:
                ax.errorbar(
                    sx["mean"],
                    sy["mean"],
                    xerr=ex,
                    yerr=ey,
                    fmt="*",
                    ms=13,
                    color="black",
                    label="STL",
                    zorder=4,
                )
                continue
            ax.errorbar(
                sx["mean"],
                sy["mean"],
                xerr=ex,
                yerr=ey,
                fmt="o",
                ms=6,
                color=colors[n],
                label=n,
                capsize=2,
                zorder=3,
            )
            pts.append((sx["mean"], sy["mean"]))
            labels.append(n)
        if len(pts) > 1:
            mask = _pareto_mask(pts, (hib[mx], hib[my]))
            front = sorted(p for p, keep in zip(pts, mask, strict=False) if keep)
            if len(front) > 1:
                ax.plot(
                    *zip(*front, strict=False),
                    "--",
                    color="grey",
                    lw=1,
                    zorder=2,
                    label="Pareto front",
                )
        ax.set_xlabel(f"{mx} {'↑' if hib[mx] else '↓'}")
        ax.set_ylabel(f"{my} {'↑' if hib[my] else '↓'}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    _title(fig, "Test metrics per method (mean ± s.e. over seeds); dashed: Pareto front")
    return _save(fig, path)


def plot_losses(
    results: dict[str, list[RunResult]], tasks: Sequence[str], path: Path
) -> Path | None:
    """Training loss per task over epochs (mean over seeds), one line per method."""
    if not tasks or not any(r.history for rs in results.values() for r in rs):
        return None
    names = [n for n in results if n != STL]
    colors = _colors(names)
    fig, axes = _figure(len(tasks), 3.6, 2.9)
    for ax, t in zip(axes, tasks, strict=False):
        for n, runs in results.items():
            xs, ys = _mean_curve(runs, f"train/{t}/loss")
            if xs:
                style = (
                    {"color": "black", "ls": "--", "lw": 1.5}
                    if n == STL
                    else {"color": colors[n], "lw": 1.2}
                )
                ax.plot(xs, ys, label="STL" if n == STL else n, **style)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _title(fig, "Training loss per task (mean over seeds)")
    return _save(fig, path)


def plot_weights(
    results: dict[str, list[RunResult]], tasks: Sequence[str], path: Path
) -> Path | None:
    """The balancer's task weights over epochs (epoch mean, mean over seeds), a panel per method."""
    methods = [
        n
        for n, runs in results.items()
        if n != STL and any(f"weight/{t}" in row for r in runs for row in r.history for t in tasks)
    ]
    if not methods:
        return None
    colors = _colors(list(tasks))
    fig, axes = _figure(len(methods), 3.4, 2.7)
    for ax, n in zip(axes, methods, strict=False):
        for t in tasks:
            xs, ys = _mean_curve(results[n], f"weight/{t}")
            if xs:
                ax.plot(
                    xs, ys, color=colors[t], label=t, lw=1.3, marker="." if len(xs) < 12 else None
                )
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _title(fig, "Task weights of the balancer (mean over an epoch's steps and over seeds)")
    return _save(fig, path)


def plot_grad_conflict(results: dict[str, list[RunResult]], path: Path) -> Path | None:
    """Heatmaps of the cosine similarity between task gradients on the shared parameters."""
    mats: dict[str, tuple[list[str], list[list[float]]]] = {}
    for n, runs in results.items():
        gcs = [r.extras["grad_conflict"] for r in runs if "grad_conflict" in r.extras]
        if not gcs:
            continue
        k = len(gcs[0]["tasks"])
        avg = [[sum(g["cosine"][i][j] for g in gcs) / len(gcs) for j in range(k)] for i in range(k)]
        mats[n] = (gcs[0]["tasks"], avg)
    if not mats:
        return None
    fig, axes = _figure(len(mats), 3.3, 3.0)
    im = None
    for ax, (n, (tasks, m)) in zip(axes, mats.items(), strict=False):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
        k = len(tasks)
        short = [t if len(t) <= 8 else t[:7] + "…" for t in tasks]
        ax.set_xticks(range(k), short, rotation=90 if k > 3 else 0, fontsize=7)
        ax.set_yticks(range(k), short, fontsize=7)
        if k <= 6:
            for i in range(k):
                for j in range(k):
                    ax.text(
                        j,
                        i,
                        f"{m[i][j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if abs(m[i][j]) > 0.6 else "black",
                    )
        ax.set_title(n, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="cosine")
    _title(fig, "Cosine similarity of task gradients on the shared parameters (final model)")
    return _save(fig, path)


# ------------------------------------------------------------------------------------ the report
def _published(suite: Suite, protocol: Protocol) -> list[Published]:
    own = suite.published(protocol)
    return list(own) if own else list(REFERENCE_TABLES.get(suite.name, []))


def _published_section(
    doc: _Doc, suite: Suite, protocol: Protocol, summary: dict[str, Any]
) -> None:
    doc.h(2, "Published numbers")
    pubs = _published(suite, protocol)
    if not pubs:
        if not suite.has_baselines:
            doc.p(
                f"references.md lists no published numbers for suite {suite.name!r}; the "
                "published findings it reproduces are qualitative and are checked in the "
                "sections above."
            )
            return
        doc.p(
            f"references.md lists no published numbers for the data of suite {suite.name!r}, so "
            "there is nothing to compare with; the numbers stand on their own (their "
            "single-task baselines are trained here under the same protocol)."
        )
        return
    rows = summary["rows"]
    for pub in pubs:
        doc.h(3, pub.source)
        doc.p(f"Published protocol: {pub.protocol}.")
        if pub.matches:
            doc.p("The suite's protocol matches the published one: the numbers are comparable.")
        else:
            doc.p(
                "The protocol does NOT match"
                + (f" ({pub.note})" if pub.note else "")
                + ": the published numbers are context only, not a comparison."
            )
        table = []
        for method in sorted(set(pub.delta_m) | {m for m in rows if m != STL}):
            ref = pub.delta_m.get(method)
            ref_text = "–" if ref is None else f"{ref:+.2f}"  # noqa: RUF001
            if ref is not None and method in pub.delta_m_se:
                ref_text += f" ± {pub.delta_m_se[method]:.2f}"
            ours = rows.get(method, {}).get("delta_m")
            table.append([method, ref_text, _pm(ours, 2, signed=True)])
        doc.table(["method", "published Δm%", "this run Δm%"], table)
        for method, values in pub.metrics.items():
            ours = rows.get(method, {}).get("metrics", {})
            mt = [[k, _num(v), _pm(ours.get(k), 4)] for k, v in values.items()]
            doc.p(
                f"Published {method.upper() if method == STL else method} metrics next to this "
                "run's:"
            )
            doc.table(["metric", "published", "this run"], mt)


def _protocol_section(doc: _Doc, protocol: Protocol, summary: dict[str, Any]) -> None:
    doc.h(2, "Protocol")
    env = summary.get("environment", {})
    doc.ul(
        [
            f"suite `{protocol.suite}`, protocol version `{protocol.version}`",
            f"seeds: {', '.join(map(str, summary['seeds']))}; "
            f"methods: {', '.join(summary['methods']) or '–'}",  # noqa: RUF001
            "each run: the checkpoint of the epoch selected on validation data is tested; "
            "metrics are mean ± standard error (sample std / √n) over seeds",
            "Δm% (Maninis et al. 2019): 100/M Σ_j (−1)^h_j (M_j − B_j)/B_j over all M metrics, "  # noqa: RUF001
            "against the single-task baseline (STL) of the same seed, then mean ± s.e. over seeds; "
            "lower is better, negative beats STL",
            "mean rank: rank of each method (STL excluded) on each metric's mean, averaged over "
            "the metrics (1 = best)",
            "s/epoch: wall time of training plus validation per epoch (STL: the sum over its "
            "single-task networks)",
            "peak MB: " + _memory_text(summary),
            f"environment: polytask {env.get('polytask', '?')}, torch {env.get('torch', '?')}, "
            f"{env.get('cpu_count', '?')} CPUs, torch threads {env.get('torch_threads', '?')}, "
            f"CUDA {env.get('cuda') or 'none'}",
        ]
    )
    doc.p("Settings (the protocol key; a stored run is reused only when these match):")
    doc.code(json.dumps(protocol.key(), indent=2))


def _memory_text(summary: dict[str, Any]) -> str:
    kinds = set(summary.get("memory_kinds", []))
    text = {
        "cpu.rss_peak_growth": "peak resident-set growth of the process during the run (the "
        "kernel's peak-RSS mark reset at the start; shared data loaded before)",
        "cpu.ru_maxrss_growth": "growth of getrusage ru_maxrss during the run (a lower bound)",
        "cuda.max_memory_allocated": "torch.cuda.max_memory_allocated during the run",
    }
    return "; ".join(text.get(k, k) for k in sorted(kinds)) or "not measured"


def write_report(
    suite: Suite,
    protocol: Protocol,
    summary: dict[str, Any],
    baselines: Sequence[RunResult],
    results: dict[str, list[RunResult]],
    out_dir: Path,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    all_runs: dict[str, list[RunResult]] = {}
    if baselines:
        all_runs[STL] = list(baselines)
    all_runs.update({m: rs for m, rs in results.items() if rs})
    summary = dict(summary)
    summary["memory_kinds"] = sorted(
        {r.extras.get("memory", {}).get("kind", "") for rs in all_runs.values() for r in rs} - {""}
    )
    tasks = list(dict.fromkeys(m.split("/")[0] for m in summary["metrics"]))

    doc = _Doc()
    doc.h(1, f"polytask benchmark: {suite.name}")
    if suite.description:
        doc.p(suite.description + ".")
    _protocol_section(doc, protocol, summary)
    doc.h(2, "Results")
    if summary["rows"]:
        head, rows, best = _table(summary)
        doc.table(head, rows, best)
        doc.p("Bold: the best method in a column (STL excluded).")
    else:
        doc.p("No finished runs yet.")
    notes = list(protocol.settings.get("notes", [])) + list(summary.get("notes", []))
    if notes:
        doc.h(3, "Notes")
        doc.ul(notes)
    for sec in suite.sections({m: rs for m, rs in results.items() if rs}):
        doc.h(2, sec["title"])
        if sec.get("text"):
            doc.p(sec["text"])
        if sec.get("table"):
            doc.table(*sec["table"])
    _published_section(doc, suite, protocol, summary)

    doc.h(2, "Plots")
    figures: list[tuple[Path | None, str]] = []
    if summary["rows"]:
        figures.append(
            (
                plot_pareto(summary, plots_dir / "pareto.png"),
                "Test metrics of each method (mean ± s.e. over seeds) on pairs of tasks; star: STL",
            )
        )
        figures.append(
            (
                plot_losses(all_runs, tasks, plots_dir / "train_loss.png"),
                "Training loss per task over epochs (mean over seeds)",
            )
        )
        figures.append(
            (
                plot_weights(results, tasks, plots_dir / "weights.png"),
                "Task weights chosen by each balancer over epochs",
            )
        )
        figures.append(
            (
                plot_grad_conflict(results, plots_dir / "grad_conflict.png"),
                "Gradient conflict: cosine similarity of the tasks' gradients on the shared "
                "parameters (final model, a few training batches; mean over seeds)",
            )
        )
    for p in suite.plots(all_runs, plots_dir):
        figures.append((Path(p), f"{suite.name}: {Path(p).stem.replace('_', ' ')}"))
    shown = [(p, c) for p, c in figures if p is not None and Path(p).exists()]
    for p, c in shown:
        doc.img(Path(p), c)
    if not shown:
        doc.p("No plots (no finished runs).")

    md = out_dir / "report.md"
    md.write_text(doc.markdown(out_dir))
    page = out_dir / "report.html"
    page.write_text(doc.html(f"polytask benchmark: {suite.name}"))
    return {"md": md, "html": page, **{f"plot:{Path(p).stem}": Path(p) for p, _ in shown}}

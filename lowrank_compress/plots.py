"""PNG figures of a compression: per-layer error vs rank, and accuracy vs parameters.

matplotlib (a dev dependency, like scikit-learn for the digits data) is imported on first use with
the non-interactive Agg backend, so plotting works on machines without a display. Every figure is
written atomically: an interrupted run leaves no half-written PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .io.files import atomic_output, check_writable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .compress import CompressReport

_COLUMNS = 6  # at most this many panels per row of the per-layer figure
_COLORS = {"spectral": "tab:blue", "nkp": "tab:orange", "kept": "tab:green"}
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install matplotlib (or the package's [dev] extra)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            # The temporary name ends in .tmp, so the format must be given explicitly.
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_compression(report: CompressReport, path: str | os.PathLike) -> None:
    """One panel per factorized layer: relative error vs rank of spectral and nkp, chosen rank marked.

    Lines are the layer's Gaussian-input error curves (``LayerReport.curves``, recorded by
    ``compress(..., curves=True)``); a layer without them shows its markers only. The dotted
    vertical line is the rank chosen; markers are the errors measured at that rank — spectral and
    the kept candidate — which for a calibrated compression are held-out post-activation errors on
    the calibration data, so they can lie well below the Gaussian curves. With network-aware
    calibration each panel also shows the layer's predicted output cost vs rank (red, right axis,
    log scale): the curve the rank allocation spent the budget on.
    """
    check_writable(path)
    plt = _pyplot()
    layers = report.layers
    if not layers:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no layer was factorized", ha="center", va="center")
        _save(fig, path)
        return
    cols = min(_COLUMNS, math.ceil(math.sqrt(len(layers))))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for method in ("spectral", "nkp"):
            curve = layer.curves.get(method)
            if curve:
                ax.plot(curve["ranks"], curve["errors"], color=_COLORS[method], lw=1.5, label=f"{method} (Gaussian)")
        ax.axvline(layer.rank, color="0.4", ls=":", lw=1, label="chosen rank")
        # candidates hold the errors the choice was made on: held-out ones when calibrated.
        spectral, kept = layer.candidates.get("spectral"), layer.candidates.get(layer.method)
        if spectral is not None:
            ax.plot([layer.rank], [spectral], "x", color=_COLORS["spectral"], ms=7, mew=2, label="spectral, measured")
        if kept is not None:
            ax.plot([layer.rank], [kept], "*", color=_COLORS["kept"], ms=10, label="kept, measured")
        cost = layer.curves.get("output_cost")
        if cost:
            twin = ax.twinx()
            positive = [(r, c) for r, c in zip(cost["ranks"], cost["costs"]) if c > 0]
            if positive:
                twin.plot(*zip(*positive), color="tab:red", lw=1.2, ls="--", label="predicted output cost")
                twin.set_yscale("log")
            twin.tick_params(labelsize=6, colors="tab:red")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{layer.name}\n{layer.activation}, {'×'.join(map(str, layer.shape))}, r={layer.rank} "
                     f"({layer.method})", fontsize=8)
        ax.set_xlabel("rank", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any(layer.curves.get("output_cost") for layer in layers):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="tab:red", ls="--", lw=1.2))
        labels.append(f"predicted output cost ({report.output_metric}), right axis")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    ratio = report.params_after / report.params_before if report.params_before else float("nan")
    fig.suptitle(
        f"post-activation error vs rank per layer (params kept {ratio:.3f}); "
        "lines: Gaussian-input model, markers: measured at the chosen rank",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    _save(fig, path)


def plot_accuracy_vs_params(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    reference: Mapping[str, Any] | None = None,
    title: str = "accuracy vs parameters",
) -> None:
    """Accuracy against parameter count, one line per method.

    ``rows``: mappings with ``method`` (str), ``params`` (int, parameters of the compressed model)
    and ``accuracy`` (a fraction in [0, 1]); the rows of one method are joined in order of
    params. ``reference`` (same keys; e.g. the uncompressed model) is drawn as a dashed horizontal
    line with its point.
    """
    check_writable(path)
    plt = _pyplot()
    by_method: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        by_method.setdefault(str(row["method"]), []).append((int(row["params"]), float(row["accuracy"])))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labelled: set[tuple[int, str]] = set()
    spot = 0.03 * max([p for pts in by_method.values() for p, _ in pts] + [1]) / 1e3  # one label per spot
    for i, (method, points) in enumerate(by_method.items()):
        points.sort()
        xs = [p / 1e3 for p, _ in points]
        ys = [100.0 * a for _, a in points]
        # Methods often tie (every one keeps full accuracy at a mild budget): later ones get smaller
        # markers of another shape so that coinciding points stay visible.
        ax.plot(xs, ys, "-", marker=_MARKERS[i % len(_MARKERS)], ms=max(3.0, 9.0 - 1.5 * i), label=method)
        for x, y in zip(xs, ys):
            key = (round(x / spot), f"{y:.1f}")
            if key not in labelled:  # not a pile of identical labels on coinciding points
                labelled.add(key)
                ax.annotate(key[1], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if reference is not None:
        x, y = int(reference["params"]) / 1e3, 100.0 * float(reference["accuracy"])
        ax.axhline(y, color="0.3", ls="--", lw=1)
        ax.plot([x], [y], "k*", ms=10, label=f"{reference.get('method', 'original')} ({y:.1f})")
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)

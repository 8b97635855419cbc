"""The figures of the run report and of the benchmark, as PNG bytes.

Figures use matplotlib's object API on the Agg canvas, never pyplot: no global
backend is switched, no window can open, and it is safe in worker processes.
Missing values (None) are left blank rather than drawn as zero.
"""

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

Value = float | None


def png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def format_value(value: Value) -> str:
    """Perplexities span 1 to 10⁵: keep about four significant figures."""
    if value is None:
        return "–"
    if abs(value) >= 10000:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _array(rows: list[list[Value]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _annotate(axes, data: np.ndarray, image, fontsize: float, text=format_value,
              colours: np.ndarray | None = None, diverging: bool = False) -> None:
    """Write each value in its cell, white on dark colours, black on light ones.
    `colours`: what the image shows, when that is not `data` itself; a diverging
    colour map is dark at both ends."""
    colours = data if colours is None else colours
    for (row, column), value in np.ndenumerate(data):
        if np.isfinite(value):
            shade = float(image.norm(colours[row, column])) if np.isfinite(colours[row, column]) else 0.5
            dark = abs(shade - 0.5) > 0.3 if diverging else shade < 0.55
            axes.text(column, row, text(float(value)), ha="center", va="center", fontsize=fontsize,
                      color="white" if dark else "black")


def ppl_heatmap(matrix: list[list[Value]], row_labels: list[str], columns: list[str], title: str) -> bytes:
    """Perplexity per (row, domain), written in the cells. Row 0 is the dense model:
    the colour is each value's change from it in percent, because domains differ
    in PPL far more than pruning changes any one of them."""
    data = _array(matrix)
    with np.errstate(divide="ignore", invalid="ignore"):
        change = 100 * (data / data[0] - 1)
    finite = change[np.isfinite(change)]
    top = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-6)
    figure = Figure(figsize=(2.5 + 1.2 * len(columns), 1.4 + 0.5 * len(row_labels)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(change), cmap="RdBu_r", norm=Normalize(-top, top), aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(row_labels)), row_labels)
    axes.set_xlabel("evaluated on")
    axes.set_title(title)
    _annotate(axes, data, image, fontsize=9, colours=change, diverging=True)
    figure.colorbar(image, ax=axes, label=f"PPL change from {row_labels[0]} (%)")
    return png(figure)


def bwt_over_steps(labels: list[str], values: list[Value]) -> bytes:
    """BWT after each step; a step with no value (the first) is marked undefined."""
    figure = Figure(figsize=(2.5 + 0.9 * len(labels), 3.6), layout="constrained")
    axes = figure.add_subplot()
    points = [(x, v) for x, v in enumerate(values) if v is not None]
    if points:
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o", color="tab:red")
        for x, y in points:
            axes.annotate(format_value(y), (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                          fontsize=8)
    for x, value in enumerate(values):
        if value is None:
            axes.annotate("undefined", (x, 0), ha="center", va="bottom", fontsize=8, color="grey")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_xlim(-0.5, len(labels) - 0.5)
    axes.set_ylabel("BWT (PPL points, lower is better)")
    axes.set_title("Backward transfer after each step")
    return png(figure)


def layer_heatmap(matrix: list[list[Value]], row_labels: list[str], layers: list[str], title: str) -> bytes:
    """Realised sparsity per (step, layer) on a fixed 0–1 scale."""
    data = _array(matrix)
    width = min(18.0, 3.0 + 0.32 * len(layers))
    figure = Figure(figsize=(width, 2.2 + 0.35 * len(row_labels)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(data), cmap="magma", norm=Normalize(0.0, 1.0), aspect="auto")
    every = max(1, len(layers) // 48)  # at most ~48 readable tick labels
    axes.set_xticks(range(0, len(layers), every), layers[::every], rotation=90, fontsize=7)
    axes.set_yticks(range(len(row_labels)), row_labels)
    axes.set_title(title)
    if data.size <= 200 and len(layers) <= 30:
        _annotate(axes, data, image, fontsize=7, text=lambda v: f"{v:.2f}")
    figure.colorbar(image, ax=axes, label="sparsity")
    return png(figure)


def grouped_bars(groups: list[str], series: dict[str, list[Value]], title: str, ylabel: str,
                 reference: tuple[str, float] | None = None, log: bool = False) -> bytes:
    """One group of bars per label in `groups`, one bar per series; missing values are gaps."""
    figure = Figure(figsize=(3.0 + 0.55 * len(groups) * max(1, len(series)) ** 0.5, 4.4), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        xs = [x + (index - (len(series) - 1) / 2) * width for x in range(len(groups))]
        heights = [np.nan if v is None else v for v in values]
        bars = axes.bar(xs, heights, width=width, label=name)
        axes.bar_label(bars, labels=[format_value(v) if v is not None else "" for v in values], fontsize=7)
    if reference:
        axes.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    if log:
        axes.set_yscale("log")
    else:
        axes.axhline(0, color="grey", linewidth=0.6)
    axes.set_xticks(range(len(groups)), groups, rotation=35, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return png(figure)

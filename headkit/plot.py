"""A tiny dependency-free line plot written as SVG (matplotlib is not a dependency).

``line_plot_svg(path, xs, {"PSNR": ys}, ...)`` draws one panel with axes, ticks at "nice"
values, a polyline with markers per series, point labels and a legend.
``scatter_plot_svg(path, points, ...)`` draws labelled points with error bars (e.g. one method
per point, mean ± std), optionally the individual values behind each as small dots, on a
linear or logarithmic x axis. The numbers in the file are the data (readable with a text
editor), so the plot cannot misstate them.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path
from collections.abc import Sequence

__all__ = ["nice_ticks", "log_ticks", "line_plot_svg", "scatter_plot_svg"]

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^n) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: non-finite range [{lo}, {hi}]")
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v < hi + step * 0.999:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _axes(size: tuple[int, int], title: str, box: tuple[float, float, float, float], xt: list[float],
          yt: list[float], px, py, x_grid: bool = False) -> list[str]:
    """SVG opening, white background, title, y grid with tick labels, x ticks (and grid) with
    labels, and the frame; ``box`` is ``(left, top, plot width, plot height)``."""
    (width, height), (left, top, pw, ph) = size, box
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>')
    for y in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x in xt:
        if x_grid:
            out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    return out


def _write_svg(path: str | os.PathLike, out: list[str]) -> Path:
    """Close the SVG and write it (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out + ["</svg>"]) + "\n")
    return path


def line_plot_svg(path: str | os.PathLike, xs: Sequence[float], series: dict[str, Sequence[float]], *,
                  title: str = "", xlabel: str = "", ylabel: str = "", width: int = 520,
                  height: int = 340, label_points: bool = True) -> Path:
    """Write a line plot of ``series`` (name -> y values, one per ``xs``) to ``path`` (SVG).

    All series share the y axis; its range is padded to nice ticks. Returns the path.
    """
    xs = [float(x) for x in xs]
    if not xs or any(len(ys) != len(xs) for ys in series.values()):
        raise ValueError("line_plot_svg: every series needs one value per x (and at least one x)")
    values = [float(y) for ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    if not values:
        raise ValueError("line_plot_svg: no finite values to plot")
    xt = nice_ticks(min(xs), max(xs), min(len(xs), 6)) if len(set(xs)) > 1 else [xs[0] - 1, xs[0], xs[0] + 1]
    yt = nice_ticks(min(values), max(values))
    left, right, top, bottom = 70, 20, 40 if title else 20, 50
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = _axes((width, height), title, (left, top, pw, ph), xt, yt, px, py)
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, ys) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(px(x), py(float(y))) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for (a, b), y in zip(pts, [y for y in ys if y is not None and math.isfinite(y)]):
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{colour}"/>')
            if label_points:
                out.append(f'<text x="{a:.1f}" y="{b - 8:.1f}" text-anchor="middle" fill="{colour}">{_fmt(float(y))}</text>')
        lx = left + pw - 10 - 7 * max(len(n) for n in series) - 18  # legend in the top-right corner
        out.append(f'<rect x="{lx}" y="{top + 10 + 18 * i}" width="12" height="3" fill="{colour}"/>'
                   f'<text x="{lx + 18}" y="{top + 15 + 18 * i}">{escape(name)}</text>')
    return _write_svg(path, out)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis covering ``[lo, hi]`` (both > 0): 1, 2, 5 x 10^n when ``hi / lo``
    is at most 100, else powers of ten; the first tick <= lo, the last >= hi."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"log_ticks: need a positive finite range, got [{lo}, {hi}]")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi < lo * 1.01:  # one value: a factor of two either side
        lo, hi = lo / 2, hi * 2
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mantissas = (1, 2, 5) if math.log10(hi / lo) <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in mantissas]
    below = [t for t in ticks if t <= lo * (1 + 1e-12)]
    above = [t for t in ticks if t >= hi * (1 - 1e-12)]
    start, end = ticks.index(below[-1]), ticks.index(above[0])
    return [float(f"{t:.12g}") for t in ticks[start:end + 1]]


def _extent(pts: Sequence[dict], err) -> tuple[list[float], list[float]]:
    """Every x and y a scatter plot must show: points with their error bars, and their members."""
    xs, ys = [], []
    for p in pts:
        x, y, dx, dy = float(p["x"]), float(p["y"]), err(p, "xerr"), err(p, "yerr")
        xs += [x - dx, x + dx]
        ys += [y - dy, y + dy]
        for mx, my in p.get("members") or ():
            if mx is not None and my is not None and math.isfinite(mx) and math.isfinite(my):
                xs.append(float(mx))
                ys.append(float(my))
    return xs, ys


def scatter_plot_svg(path: str | os.PathLike, points: Sequence[dict], *, title: str = "",
                     xlabel: str = "", ylabel: str = "", xlog: bool = False, width: int = 560,
                     height: int = 380, note: str = "") -> Path:
    """Write labelled points with error bars to ``path`` (SVG) and return the path.

    Each point is a dict: ``label``, ``x``, ``y`` (e.g. means), optional ``xerr``/``yerr``
    (half-widths of the bars, e.g. standard deviations; 0 or None: no bar) and optional
    ``members``, a list of ``(x, y)`` drawn as small faint dots in the point's colour (e.g.
    the runs behind a mean). ``xlog``: logarithmic x axis (all x must be > 0). ``note``: a
    line of small text under the axis (e.g. "mean ± std over 3 subjects x 2 seeds").
    """
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None
           and math.isfinite(float(p["x"])) and math.isfinite(float(p["y"]))]
    if not pts:
        raise ValueError("scatter_plot_svg: no point with finite x and y")

    def err(p: dict, k: str) -> float:
        v = p.get(k)
        return float(v) if v is not None and math.isfinite(float(v)) else 0.0

    xs, ys = _extent(pts, err)
    pad = 0.04 * (max(ys) - min(ys))  # markers clear of the frame
    ys = [min(ys) - pad, max(ys) + pad]
    if xlog:
        if min(float(p["x"]) for p in pts) <= 0:
            raise ValueError("scatter_plot_svg: xlog needs every x > 0")
        xs = [x for x in xs if x > 0]
        xt = log_ticks(min(xs), max(xs))
    else:
        xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(ys), max(ys))
    left, right, top, bottom = 70, 30, 40 if title else 20, 50 + (16 if note else 0)
    pw, ph = width - left - right, height - top - bottom
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)

    def px(x: float) -> float:
        x = max(x, xt[0] * 1e-3) if xlog else x
        return left + (fx(x) - fx(xt[0])) / (fx(xt[-1]) - fx(xt[0])) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = _axes((width, height), title, (left, top, pw, ph), xt, yt, px, py, x_grid=True)
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 38}" text-anchor="middle">'
               f'{escape(xlabel + (" (log scale)" if xlog else ""))}</text>')
    if note:
        out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="10" '
                   f'fill="#555">{escape(note)}</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    for i, p in enumerate(pts):
        colour = COLOURS[i % len(COLOURS)]
        x, y, dx, dy = float(p["x"]), float(p["y"]), err(p, "xerr"), err(p, "yerr")
        for mx, my in p.get("members") or ():
            if mx is not None and my is not None and math.isfinite(mx) and math.isfinite(my) and (not xlog or mx > 0):
                out.append(f'<circle cx="{px(mx):.1f}" cy="{py(my):.1f}" r="2.5" fill="{colour}" '
                           f'fill-opacity="0.35"/>')
        cx, cy = px(x), py(y)
        if dy > 0:
            out.append(f'<path d="M{cx:.1f},{py(y - dy):.1f}V{py(y + dy):.1f}M{cx - 4:.1f},{py(y - dy):.1f}'
                       f'h8M{cx - 4:.1f},{py(y + dy):.1f}h8" stroke="{colour}" stroke-width="1.5"/>')
        if dx > 0:
            x0, x1 = px(x - dx) if (not xlog or x - dx > 0) else left, px(x + dx)
            out.append(f'<path d="M{x0:.1f},{cy:.1f}H{x1:.1f}M{x0:.1f},{cy - 4:.1f}v8M{x1:.1f},{cy - 4:.1f}v8" '
                       f'stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}" stroke="white"/>')
        anchor, tx = ("end", cx - 8) if cx > left + 0.75 * pw else ("start", cx + 8)
        label = escape(str(p.get("label", "")))
        for paint in ('fill="white" stroke="white" stroke-width="3"', f'fill="{colour}"'):  # a halo, then the text
            out.append(f'<text x="{tx:.1f}" y="{cy - 7:.1f}" text-anchor="{anchor}" {paint}>{label}</text>')
    return _write_svg(path, out)

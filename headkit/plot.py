"""A tiny dependency-free line plot written as SVG (matplotlib is not a dependency).

``line_plot_svg(path, xs, {"PSNR": ys}, ...)`` draws one panel with axes, ticks at "nice"
values, a polyline with markers per series, point labels and a legend. The numbers in the
file are the data (readable with a text editor), so the plot cannot misstate them.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path
from collections.abc import Sequence

__all__ = ["nice_ticks", "line_plot_svg"]

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

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>')
    for y in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x in xt:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
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
    out.append("</svg>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path

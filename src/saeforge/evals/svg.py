"""Inline SVG charts for the HTML reports: line, histogram and scatter, no plotting dependency.

Why hand-written SVG: the report must be one self-contained file that opens anywhere (no CDN, no
matplotlib install, text that stays sharp and searchable). Each chart is an ``<svg class="plot"
data-plot=NAME>`` whose marks carry ``data-x``/``data-y`` so tests (and readers) can check what is drawn.
Non-finite values (NaN metrics) are skipped, never drawn at a made-up place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

W, H = 560, 320
ML, MR, MT, MB = 64, 16, 34, 46  # margins: left (y ticks), right, top (title), bottom (x ticks + label)
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class _Axes:
    def __init__(self, xs: Sequence[float], ys: Sequence[float], y_range: tuple[float, float] | None = None):
        xs = [x for x in xs if _finite(x)] or [0.0, 1.0]
        ys = [y for y in ys if _finite(y)] or [0.0, 1.0]
        self.xt = nice_ticks(min(xs), max(xs))
        lo, hi = y_range if y_range else (min(ys), max(ys))
        self.yt = nice_ticks(min(lo, min(ys)), max(hi, max(ys)))
        self.x0, self.x1, self.y0, self.y1 = self.xt[0], self.xt[-1], self.yt[0], self.yt[-1]

    def px(self, x: float) -> float:
        return ML + (x - self.x0) / ((self.x1 - self.x0) or 1) * (W - ML - MR)

    def py(self, y: float) -> float:
        return H - MB - (y - self.y0) / ((self.y1 - self.y0) or 1) * (H - MT - MB)

    def frame(self, name: str, title: str, xlabel: str, ylabel: str) -> list[str]:
        out = [
            f'<svg class="plot" data-plot="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{escape(title)}">',
            f'<text x="{W / 2}" y="20" text-anchor="middle" class="title">{escape(title)}</text>',
        ]
        for t in self.xt:
            x = self.px(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{H - MB}" class="grid"/>'
                f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">{_fmt(t)}</text>'
            )
        for t in self.yt:
            y = self.py(t)
            out.append(
                f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>'
            )
        out.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(
            f'<text transform="translate(14 {(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle">'
            f"{escape(ylabel)}</text>"
        )
        return out


def _legend(labels: Sequence[str]) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        y = MT + 6 + 14 * i
        out.append(
            f'<rect x="{W - MR - 150}" y="{y - 8}" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
            f'<text x="{W - MR - 136}" y="{y + 1}" class="legend">{escape(label[:24])}</text>'
        )
    return out


def line_chart(
    name: str,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    vline: tuple[float, str] | None = None,
) -> str:
    """One polyline per (label, xs, ys); a gap wherever y is not finite; optional labelled vertical line."""
    ax = _Axes(
        [x for _, xs, _ in series for x in xs] + ([vline[0]] if vline else []), [y for _, _, ys in series for y in ys]
    )
    out = ax.frame(name, title, xlabel, ylabel)
    for i, (label, xs, ys) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        runs, run = [], []
        for x, y in zip(xs, ys):
            if _finite(x) and _finite(y):
                run.append((x, y))
            elif run:
                runs.append(run), run.clear()
        runs.append(run)
        for r in runs:
            if len(r) > 1:
                pts = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y in r)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for x, y in r:
                out.append(
                    f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="3" fill="{colour}" '
                    f'data-series="{escape(label)}" data-x="{x!r}" data-y="{y!r}"><title>{escape(label)}: '
                    f"{_fmt(x)}, {_fmt(y)}</title></circle>"
                )
    if vline is not None:
        x = ax.px(vline[0])
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{H - MB}" class="vline"/>'
            f'<text x="{x + 4:.1f}" y="{H - MB - 6}" class="legend">{escape(vline[1])}</text>'
        )
    if len(series) > 1:
        out += _legend([s[0] for s in series])
    return "\n".join(out + ["</svg>"])


def histogram(name: str, title: str, xlabel: str, ylabel: str, edges: Sequence[float], counts: Sequence[int]) -> str:
    """Bars over [edges[i], edges[i+1]) with height counts[i]."""
    ax = _Axes(list(edges), [0, *counts])
    out = ax.frame(name, title, xlabel, ylabel)
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        x0, x1, y = ax.px(a), ax.px(b), ax.py(c)
        out.append(
            f'<rect class="bar" x="{x0 + 1:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 2):.1f}" '
            f'height="{ax.py(0) - y:.1f}" data-x="{a!r}" data-y="{c}"><title>[{_fmt(a)}, {_fmt(b)}): '
            f"{c}</title></rect>"
        )
    return "\n".join(out + ["</svg>"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower x = sparser, higher y = better), sorted by x."""
    idx = [i for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)]
    front = [
        i
        for i in idx
        if not any(
            points[j][0] <= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i] for j in idx
        )
    ]
    return sorted(front, key=lambda i: points[i][0])


def scatter(
    name: str,
    title: str,
    xlabel: str,
    ylabel: str,
    labels: Sequence[str],
    points: Sequence[tuple[float, float]],
    highlight: int | None = None,
) -> str:
    """Labelled points with the Pareto front (sparser and better) joined by a line; ``highlight`` ringed."""
    ax = _Axes([p[0] for p in points], [p[1] for p in points])
    out = ax.frame(name, title, xlabel, ylabel)
    front = pareto_front(points)
    if len(front) > 1:
        pts = " ".join(f"{ax.px(points[i][0]):.1f},{ax.py(points[i][1]):.1f}" for i in front)
        out.append(f'<polyline class="front" points="{pts}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    for i, ((x, y), label) in enumerate(zip(points, labels)):
        if not (_finite(x) and _finite(y)):
            continue
        colour = COLOURS[i % len(COLOURS)]
        ring = ' stroke="#000" stroke-width="2"' if i == highlight else ""
        out.append(
            f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="{6 if i == highlight else 5}" fill="{colour}"'
            f'{ring} data-series="{escape(label)}" data-x="{x!r}" data-y="{y!r}"><title>{escape(label)}: '
            f"{_fmt(x)}, {_fmt(y)}</title></circle>"
            f'<text x="{ax.px(x) + 8:.1f}" y="{ax.py(y) - 6:.1f}" class="legend">{escape(label[:24])}</text>'
        )
    return "\n".join(out + ["</svg>"])

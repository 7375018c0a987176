"""Self-contained HTML pages: one SAE's report (``eval --report``) and a side-by-side comparison.

Everything is inline (CSS and SVG from ``svg.py``; no script, no network), so the file can be mailed,
archived next to eval.json, or opened from disk years later and look the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from saeforge.evals import svg
from saeforge.evals.report import metrics_rows
from saeforge.io import atomic_write_text

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { border: 1px solid #e4e4e4; background: #fff; font-size: 11px; }
svg.plot .title { font-size: 13px; font-weight: 600; } svg.plot .grid { stroke: #eee; }
svg.plot .vline { stroke: #888; stroke-dasharray: 5 4; } svg.plot .legend { font-size: 11px; }
svg.plot .bar { fill: #1f77b4; } .note { color: #666; font-size: 12px; max-width: 900px; }
"""


def html_page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return escape(str(v))
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return escape(str(v))


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{escape(a)}</td><td>{escape(b)}</td></tr>" for a, b in rows)
    return f'<table class="metrics"><tr><th>metric</th><th>value</th></tr>{cells}</table>'


def density_plot(m: dict[str, Any]) -> str:
    return svg.histogram(
        "density",
        f"Latent firing frequency ({m['n_tokens']:,} tokens)",
        "log10(frequency + 1e-10)",
        "latents",
        m["log10_freq_hist_edges"],
        m["log10_freq_hist_counts"],
    )


def _mid(bp: dict[str, Any]) -> list[float]:
    return [(a + b - 1) / 2 for a, b in zip(bp["start"], bp["end"])]


def position_plots(entries: Sequence[tuple[str, dict[str, Any]]], trained_context: int | None) -> list[str]:
    """EV and CE score by position, one line per SAE; a dashed line where the training context ended."""
    with_pos = [(n, m["by_position"]) for n, m in entries if m.get("by_position")]
    if not with_pos:
        return []
    vline = (trained_context - 0.5, f"trained context {trained_context}") if trained_context else None
    plots = [
        svg.line_chart(
            "position-ev",
            "Explained variance by position",
            "position in context",
            "explained variance",
            [(n, _mid(bp), bp["explained_variance"]) for n, bp in with_pos],
            vline,
        )
    ]
    if all("ce_score" in bp for _, bp in with_pos):
        series = [(n, _mid(bp), bp["ce_score"]) for n, bp in with_pos]
        if len(with_pos) == 1 and "ce_score_mean" in with_pos[0][1]:
            bp = with_pos[0][1]
            series = [
                ("vs zero ablation", _mid(bp), bp["ce_score"]),
                ("vs mean ablation", _mid(bp), bp["ce_score_mean"]),
            ]
        plots.append(
            svg.line_chart(
                "position-ce",
                "CE score by position (of the hooked activation)",
                "position in context",
                "CE score",
                series,
                vline,
            )
        )
    return plots


def pareto_plots(entries: Sequence[tuple[str, dict[str, Any]]], highlight: int | None = None) -> list[str]:
    labels = [n for n, _ in entries]
    plots = [
        svg.scatter(
            "pareto-ev",
            "L0 vs explained variance",
            "L0 (latents per token)",
            "explained variance",
            labels,
            [(m.get("l0", math.nan), m.get("explained_variance", math.nan)) for _, m in entries],
            highlight,
        )
    ]
    if any("groundtruth" in m for _, m in entries):  # `saeforge probe` results (docs/groundtruth.md)
        for key, title, ylabel in (
            ("coverage", "L0 vs coverage (Python syntax)", "coverage"),
            ("sparse_probing_k1", "L0 vs 1-sparse probing accuracy", "test accuracy, k = 1"),
        ):
            plots.append(
                svg.scatter(
                    f"pareto-{key.replace('_', '-')}",
                    title,
                    "L0 (latents per token)",
                    ylabel,
                    labels,
                    [(m.get("l0", math.nan), _gt(m, key)) for _, m in entries],
                    highlight,
                )
            )
    if any("ce_score" in m for _, m in entries):
        plots.append(
            svg.scatter(
                "pareto-ce",
                "L0 vs CE score",
                "L0 (latents per token)",
                "CE score (vs zero)",
                labels,
                [(m.get("l0", math.nan), m.get("ce_score", math.nan)) for _, m in entries],
                highlight,
            )
        )
    return plots


def _gt(m: dict[str, Any], key: str) -> float:
    v = (m.get("groundtruth") or {}).get(key)
    return math.nan if v is None else float(v)


GROUNDTRUTH_ROWS = [
    ("coverage", "coverage (mean best-latent F1)"),
    ("reconstruction", "reconstruction (OR of precise latents, F1)"),
    ("sparse_probing_k1", "sparse probing, k = 1 (balanced accuracy)"),
    ("sparse_probing_k5", "sparse probing, k = 5"),
    ("residual_probing_k1", "residual dimension probing, k = 1"),
    ("dense_probing", "dense residual probe"),
    ("tpp", "TPP"),
    ("n_tokens", "labelled tokens"),
]


def groundtruth_section(m: dict[str, Any]) -> list[str]:
    """The report's "Ground truth" section: `saeforge probe`'s headline numbers, or how to get them."""
    gt = m.get("groundtruth")
    if not gt:
        return [
            "<h2>Ground truth</h2>",
            '<p class="note">No ground-truth result for this SAE and corpus: run <code>saeforge probe SAE_DIR</code> '
            "(Python syntax properties, docs/groundtruth.md), then this report again.</p>",
        ]
    return [
        "<h2>Ground truth</h2>",
        _table([(label, _num(gt.get(key))) for key, label in GROUNDTRUTH_ROWS]),
        f'<p class="note">From {escape(str(gt.get("file")))} (<code>saeforge probe</code>): Python syntax '
        "properties of held-out tokens; per-property numbers are in that file.</p>",
    ]


COMPARE_KEYS = [
    ("d_sae", "latents"),
    ("l0", "L0"),
    ("explained_variance", "explained variance"),
    ("mse", "MSE"),
    ("shrinkage_gamma", "shrinkage gamma"),
    ("ce_score", "CE score (vs zero)"),
    ("ce_score_mean", "CE score (vs mean)"),
    ("kl_score", "KL score"),
    ("ce_sae", "CE with SAE"),
    ("dead_count", "dead"),
    ("rare_count", "rare (< 1e-5)"),
    ("dense_count_1pct", "dense (> 1%)"),
    ("dense_count", "dense (> 10%)"),
    ("n_tokens", "tokens scored"),
]


def compare_table(entries: Sequence[tuple[str, dict[str, Any]]]) -> str:
    head = "".join(f"<th>{escape(n)}</th>" for n, _ in entries)
    rows = []
    nested = {"mdl_bits": ("mdl", "dl_bits"), "absorption_rate": ("absorption", "absorption_rate")}
    for key, label in COMPARE_KEYS + [("mdl_bits", "MDL (bits/token)"), ("absorption_rate", "absorption rate")]:
        vals = [(m.get(nested[key][0]) or {}).get(nested[key][1]) if key in nested else m.get(key) for _, m in entries]
        if all(v is None for v in vals):
            continue
        rows.append(
            f"<tr><td>{escape(label)}</td>" + "".join(f'<td class="num">{_num(v)}</td>' for v in vals) + "</tr>"
        )
    return f'<table class="compare"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def dictionary_section(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """MMCS and stitching results from ``dictionaries.compare_dictionaries``."""
    if not pairs:
        return []
    rows = []
    for p in pairs:
        st = p.get("stitching") or {}
        rows.append(
            "<tr>"
            + "".join(
                f'<td class="num">{_num(v)}</td>'
                for v in [
                    p["a"],
                    p["b"],
                    p["mmcs_a_to_b"],
                    p["mmcs_b_to_a"],
                    st.get("n_reconstruction"),
                    st.get("n_novel"),
                    st.get("mse_narrow"),
                    st.get("mse_plus_reconstruction"),
                    st.get("mse_plus_novel"),
                ]
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in [
            "A",
            "B",
            "MMCS A&rarr;B",
            "MMCS B&rarr;A",
            "wider: reconstruction-like",
            "wider: novel",
            "MSE narrower",
            "+ reconstruction-like",
            "+ novel",
        ]
    )
    return [
        "<h2>Dictionaries</h2>",
        f'<table class="dictionaries"><tr>{head}</tr>{"".join(rows)}</table>',
        "<p class=\"note\">MMCS: mean over A's decoder rows of the max cosine to any of B's. Stitching (pairs of "
        "different widths): the wider SAE's latents split by max decoder cosine to the narrower one "
        "(reconstruction-like at or above the threshold, novel below); the MSE columns add each group's "
        "decoded contribution to the narrower SAE's reconstruction.</p>",
    ]


def render_report(
    name: str,
    m: dict[str, Any],
    others: Sequence[tuple[str, dict[str, Any]]] = (),
    trained_context: int | None = None,
    sections: Sequence[str] = (),
) -> str:
    """One SAE's page: metrics table, density histogram, per-position curves, and where it sits among ``others``.

    ``sections``: further HTML blocks appended at the end (the training curves, evals/curves.py)."""
    body = [
        f"<h1>SAE report: {escape(name)}</h1>",
        f'<p class="note">{escape(str(m.get("model")))} at {escape(str(m.get("hook")))}, held-out text of '
        f"{escape(str(m.get('corpus')))}, windows of {m.get('context_size')} tokens"
        + (f" (trained on {trained_context})" if trained_context else "")
        + ".</p>",
        "<h2>Metrics</h2>",
        _table(metrics_rows(m)),
        "<h2>Feature density</h2>",
        '<div class="plots">',
        density_plot(m),
        "</div>",
        f'<p class="note">dead {m.get("dead_count")}, rare (&lt; 1e-5, fired) {m.get("rare_count")}'
        + ("" if m.get("rare_resolvable", True) else " (not resolvable at this token count)")
        + f", dense &gt; 1% {m.get('dense_count_1pct')}, dense &gt; 10% {m.get('dense_count')} of {m.get('d_sae')}.</p>",
    ]
    pos = position_plots([(name, m)], trained_context)
    if pos:
        body += ["<h2>By position in the context</h2>", '<div class="plots">', *pos, "</div>"]
    if others:
        entries = [(name, m), *others]
        body += [
            "<h2>Against other SAEs</h2>",
            '<div class="plots">',
            *pareto_plots(entries, highlight=0),
            "</div>",
            compare_table(entries),
        ]
    body += groundtruth_section(m)
    body += dictionary_section(m.get("dictionaries", []))
    body += sections
    return html_page(f"SAE report: {name}", body)


def render_compare(
    entries: Sequence[tuple[str, dict[str, Any]]],
    pairs: Sequence[dict[str, Any]] = (),
    trained_context: int | None = None,
) -> str:
    """Several SAEs scored on the same held-out tokens: table, Pareto plots, per-position curves, dictionaries."""
    first = entries[0][1]
    body = [
        f"<h1>SAE comparison ({len(entries)} SAEs)</h1>",
        f'<p class="note">{escape(str(first.get("model")))}, held-out text of {escape(str(first.get("corpus")))}: '
        "every SAE scored on the same windows.</p>",
        compare_table(entries),
        "<h2>Sparsity vs fidelity</h2>",
        '<div class="plots">',
        *pareto_plots(entries),
        "</div>",
    ]
    pos = position_plots(entries, trained_context)
    if pos:
        body += ["<h2>By position in the context</h2>", '<div class="plots">', *pos, "</div>"]
    body += dictionary_section(pairs)
    return html_page("SAE comparison", body)


def write_html(text: str, path: str | Path) -> Path:
    atomic_write_text(path, text)
    return Path(path)

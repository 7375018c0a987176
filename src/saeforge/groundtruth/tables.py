"""The tables ``saeforge probe`` prints: per property for one SAE, and one row per SAE for several."""

from __future__ import annotations

from saeforge.groundtruth.absorption import format_absorption
from saeforge.groundtruth.labels import PROPERTIES


def format_groundtruth(result: dict, ks: tuple[int, ...] = (1, 5, 20)) -> str:
    """The per-property table and the averages, as ``saeforge probe`` prints them."""
    cov, rec, pr = result["coverage"], result["reconstruction"], result["probing"]
    ks = tuple(k for k in ks if k in pr["sae"] or str(k) in pr["sae"])
    head = ["property", "pos", "cov F1", "latent", "t", "recon F1"]
    head += [f"sae k={k}" for k in ks] + [f"res k={k}" for k in ks] + ["dense"]
    rows = [head]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    def acc(kind, k, name):
        d = pr[kind].get(k, pr[kind].get(str(k)))
        return fmt(d["per_property"][name])

    for name in PROPERTIES:
        c = cov["per_property"][name]
        row = [name, "0" if c is None else str(c["positives"])]
        row += ["-", "-", "-"] if c is None else [fmt(c["f1"]), str(c["latent"]), f"{c['t']:.1f}"]
        row += [fmt(rec["per_property"][name])]
        row += [acc("sae", k, name) for k in ks] + [acc("residual", k, name) for k in ks]
        row += [fmt(pr["dense"]["per_property"][name])]
        rows.append(row)
    mean = ["mean", "", fmt(cov["coverage"]), "", "", fmt(rec["reconstruction"])]
    mean += [fmt(pr["sae"].get(k, pr["sae"].get(str(k)))["mean"]) for k in ks]
    mean += [fmt(pr["residual"].get(k, pr["residual"].get(str(k)))["mean"]) for k in ks]
    mean += [fmt(pr["dense"]["mean"])]
    rows.append(mean)
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    lines = ["  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))) for r in rows]
    d = result["documents"]
    lines.append(
        f"coverage {fmt(cov['coverage'])} (best single t {cov['best_t']}: {fmt(cov['coverage_at_best_t'])}), "
        f"reconstruction {fmt(rec['reconstruction'])} at t {rec['t']}; {result['n_tokens']} tokens, "
        f"{pr['tokens']} probed (balanced accuracy, chance 0.5); TPP {_tpp_line(result.get('tpp', {}))}; documents: {d['code']} code, {d['prose']} prose, {d['unparseable']} unparseable (skipped)"
    )
    lines.append(format_absorption(result.get("absorption", {})))
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """One line per probed SAE (e.g. every layer of a sweep): the averages side by side."""

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    def probe_mean(r, kind, k=None):
        d = r["probing"][kind]
        d = d if k is None else d.get(k, d.get(str(k)))
        return d["mean"]

    head = ["sae", "hook", "arch", "L0", "coverage", "recon", "sae k=1", "sae k=5", "res k=1", "dense", "TPP"]
    head += ["full abs"]
    rows = [head]
    for r in results:
        rows.append(
            [
                str(r["sae"]),
                str(r["hook"]),
                str(r.get("architecture", "-")),
                "-" if r.get("l0") is None else f"{r['l0']:.1f}",
                fmt(r["coverage"]["coverage"]),
                fmt(r["reconstruction"]["reconstruction"]),
                fmt(probe_mean(r, "sae", 1)),
                fmt(probe_mean(r, "sae", 5)),
                fmt(probe_mean(r, "residual", 1)),
                fmt(probe_mean(r, "dense")),
                fmt(r.get("tpp", {}).get("mean")),
                fmt(r.get("absorption", {}).get("full_absorption")),
            ]
        )
    widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
    return "\n".join(
        "  ".join(v.ljust(w) if j < 3 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in rows
    )


def _tpp_line(tpp: dict) -> str:
    if "groups" not in tpp:
        return "-"
    parts = [f"{g} {'-' if v['tpp'] is None else format(v['tpp'], '.3f')}" for g, v in tpp["groups"].items()]
    return ("-" if tpp["mean"] is None else f"{tpp['mean']:.3f}") + f" ({', '.join(parts)})"

"""``saeforge probe``: ground-truth metrics of a saved SAE on the held-out Python of its corpus.

Three streamed passes over the same labelled held-out windows (labels need each token's character
offsets, so windows come from groundtruth/windows.py, not the eval packer), stopping once ``tokens``
labelled tokens are seen:
1. the LM and the SAE once: each latent's maximum (the thresholds need it) and the probing sample
   (about ``probe_tokens`` labelled tokens' activations, drawn at random over the whole budget);
2. coverage counts over all windows, precision counts over the even-numbered windows;
3. the OR of the high-precision latents over the odd-numbered windows (reconstruction).
Then, on the probing sample: k-sparse probing (probing.py) and TPP (tpp.py); and, on single-word
vocabulary tokens rather than the corpus, SAEBench's first-letter absorption (absorption.py).
Memory is one batch, the count tensors (O(P * d_sae * 10)) and the probing sample, whatever
``tokens`` is. A transcoder is probed through its latents (read from its input hook); the residual
baselines use that input hook too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch

from saeforge.config import EvalSetup
from saeforge.data import excluded_mask, iter_documents, split_documents
from saeforge.evals.report import _json_safe, check_width
from saeforge.evals.saved import groundtruth_path
from saeforge.evals.setup import eval_setup_for
from saeforge.evals.splice import run_sae
from saeforge.groundtruth.absorption import first_letter_absorption, format_absorption
from saeforge.groundtruth.labels import PROPERTIES, NoPythonError, check_offsets
from saeforge.groundtruth.metrics import OrCounts, ThresholdCounts, coverage, reconstruction
from saeforge.groundtruth.probing import KS, ProbeSample, k_sparse_probing
from saeforge.groundtruth.tpp import tpp_all
from saeforge.groundtruth.windows import LabelledWindow, WindowStats, labelled_windows
from saeforge.io import atomic_write_text
from saeforge.models import capture, load_model, resolve_hook
from saeforge.saes.formats import load_sae

DEFAULT_TOKENS = 50_000
DEFAULT_PROBE_TOKENS = 4000


def probe_saved(
    sae_dir: str | Path,
    overrides: dict[str, dict] | None = None,
    tokens: int = DEFAULT_TOKENS,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    progress: bool = True,
    lm=None,
) -> tuple[dict, Path]:
    """Load the SAE and its model, run ``probe``, write the JSON; returns (result, path written)."""
    cfg = eval_setup_for(sae_dir, overrides)
    path = groundtruth_path(sae_dir, cfg.data.corpus)
    if lm is None:
        lm = load_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, random_init=cfg.model.random_init
        )
    check_offsets(lm.tokenizer, cfg.model.name)  # before any work
    sae = load_sae(sae_dir, device=str(lm.device))
    result = probe(lm, sae, cfg, tokens, probe_tokens, progress)
    result = {"sae": str(sae_dir), "model": cfg.model.name, "hook": cfg.model.hook, "corpus": cfg.data.corpus, **result}
    atomic_write_text(path, json.dumps(_json_safe(result), indent=2) + "\n")
    return result, path


def _windows(lm, cfg: EvalSetup, tokens: int, stats: WindowStats) -> Iterator[LabelledWindow]:
    docs = split_documents(iter_documents(cfg.data), cfg.data, "heldout")
    seen = 0
    for w in labelled_windows(docs, lm.tokenizer, cfg.data, stats, cfg.model.name):
        if seen >= tokens:
            return
        seen += int(w.valid_TP.any(-1).sum())
        yield w


def _batches(lm, cfg: EvalSetup, tokens: int, stats: WindowStats):
    """(window index of the first row, tokens_ST, labels_NP, valid_NP, keep_ST) a batch at a time."""
    it = _windows(lm, cfg, tokens, stats)
    i = 0
    while chunk := list(islice(it, cfg.eval.batch_size)):
        tokens_ST = torch.stack([w.tokens_T for w in chunk])
        labels_STP = torch.stack([w.labels_TP for w in chunk])
        valid_STP = torch.stack([w.valid_TP for w in chunk])
        keep_ST = valid_STP.any(-1) & ~excluded_mask(tokens_ST, lm.tokenizer, cfg.data)
        yield i, tokens_ST, labels_STP, valid_STP, keep_ST
        i += len(chunk)


def probe(lm, sae, cfg: EvalSetup, tokens: int, probe_tokens: int, progress: bool = False) -> dict:
    """Coverage, reconstruction and k-sparse probing on held-out labelled tokens (see the module docstring)."""
    hook = resolve_hook(lm.model, cfg.model.hook)
    with torch.inference_mode():
        passes = _passes(lm, sae, cfg, hook, tokens, probe_tokens, progress)
    stats, n_tokens, n_windows, sample, cover, ors = passes
    # outside inference mode: the probes are fitted by autograd (inference tensors would refuse it)
    x_ND, y_NP, v_NP, test_N = sample.tensors()

    def encode(x):
        return run_sae(sae, x.to(lm.device))[0]

    probing = k_sparse_probing(x_ND, encode, y_NP, v_NP, PROPERTIES, test_N=test_N)
    tpp = (
        {"error": "TPP ablates decoder directions in the probed hook; a transcoder's decoder writes another hook"}
        if cfg.model.hook_out
        else tpp_all(x_ND, encode, sae.W_dec, y_NP, v_NP, test_N)
    )
    absorption = (
        {"error": "absorption reads decoder directions in the probed hook; a transcoder's decoder writes another hook"}
        if cfg.model.hook_out
        else first_letter_absorption(lm, hook, sae, encode)
    )
    return {
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "documents": {"code": stats.n_code, "prose": stats.n_prose, "unparseable": stats.n_unparseable},
        "coverage": coverage(cover, PROPERTIES),
        "reconstruction": reconstruction(ors, PROPERTIES),
        "probing": probing,
        "tpp": tpp,
        "absorption": absorption,
    }


def _passes(lm, sae, cfg: EvalSetup, hook, tokens: int, probe_tokens: int, progress: bool):
    def acts(tokens_ST, keep_ST):
        x_STD = capture(lm.model, [hook], tokens_ST)[hook.name]
        if tokens_ST is first_tokens[0]:  # a wrong model or hook fails here, naming both widths
            out_width = getattr(sae, "d_out", None) if cfg.model.hook_out else None
            check_width(sae, x_STD.shape[-1], hook.name, lm.name, out_width, cfg.model.hook_out)
        x_ND = x_STD[keep_ST.to(x_STD.device)].float()
        return x_ND, run_sae(sae, x_ND)[0].float().cpu()

    first_tokens: list = [None]
    stats = WindowStats()
    max_F = None
    sample = ProbeSample(probe_tokens)
    gen = torch.Generator().manual_seed(0)
    rate = min(1.0, 1.1 * probe_tokens / tokens)
    n_tokens = n_windows = 0
    for i, tokens_ST, y_STP, v_STP, keep_ST in _progress(_batches(lm, cfg, tokens, stats), progress, "max"):
        if i == 0:
            first_tokens[0] = tokens_ST
        x_ND, f_NF = acts(tokens_ST, keep_ST)
        batch_max = f_NF.amax(0) if len(f_NF) else None
        if batch_max is not None:
            max_F = batch_max if max_F is None else torch.maximum(max_F, batch_max)
        # a seeded Bernoulli draw spreads the probe sample over the whole budget; every fifth window tests
        draw_ST = torch.rand(keep_ST.shape, generator=gen) < rate
        test_ST = _window_index(i, keep_ST) % 5 == 4
        pick_N = draw_ST[keep_ST]
        sample.add(
            x_ND[pick_N.to(x_ND.device)], y_STP[keep_ST][pick_N], v_STP[keep_ST][pick_N], test_ST[keep_ST][pick_N]
        )
        n_tokens += len(x_ND)
        n_windows = i + len(tokens_ST)
    if stats.n_code == 0 or max_F is None:
        raise NoPythonError(
            f"no held-out document of {cfg.data.corpus!r} parses as Python ({stats.n_prose} prose, "
            f"{stats.n_unparseable} unparseable, e.g. {stats.unparseable_ids[:3]}). Pass a corpus of Python "
            "source: --data.corpus python-stdlib, or a folder of .py files (or .jsonl, one module per line)."
        )
    P = len(PROPERTIES)
    cover, select = ThresholdCounts(P, max_F), ThresholdCounts(P, max_F)
    for i, tokens_ST, y_STP, v_STP, keep_ST in _progress(_batches(lm, cfg, tokens, WindowStats()), progress, "cover"):
        _, f_NF = acts(tokens_ST, keep_ST)
        y_NP, v_NP = y_STP[keep_ST], v_STP[keep_ST]
        cover.update(f_NF, y_NP, v_NP)
        even_N = (_window_index(i, keep_ST) % 2 == 0)[keep_ST]
        select.update(f_NF, y_NP, v_NP & even_N[:, None])
    ors = OrCounts(select.precise_PFT(), max_F)
    for i, tokens_ST, y_STP, v_STP, keep_ST in _progress(_batches(lm, cfg, tokens, WindowStats()), progress, "or"):
        _, f_NF = acts(tokens_ST, keep_ST)
        odd_N = (_window_index(i, keep_ST) % 2 == 1)[keep_ST]
        ors.update(f_NF, y_STP[keep_ST], v_STP[keep_ST] & odd_N[:, None])
    return stats, n_tokens, n_windows, sample, cover, ors


def _window_index(first: int, keep_ST: torch.Tensor) -> torch.Tensor:
    S, T = keep_ST.shape
    return (first + torch.arange(S))[:, None].expand(S, T)


def _progress(it, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, desc=f"groundtruth {desc}", unit="batch", disable=None if progress else True)


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

    head = ["sae", "hook", "coverage", "recon", "sae k=1", "sae k=5", "res k=1", "dense", "TPP", "full abs"]
    rows = [head]
    for r in results:
        rows.append(
            [
                str(r["sae"]),
                str(r["hook"]),
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
        "  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in rows
    )


def _tpp_line(tpp: dict) -> str:
    if "groups" not in tpp:
        return "-"
    parts = [f"{g} {'-' if v['tpp'] is None else format(v['tpp'], '.3f')}" for g, v in tpp["groups"].items()]
    return ("-" if tpp["mean"] is None else f"{tpp['mean']:.3f}") + f" ({', '.join(parts)})"


__all__ = ["KS", "format_groundtruth", "format_summary", "groundtruth_path", "probe", "probe_saved"]

"""``saeforge probe``: ground-truth metrics of saved SAEs on the held-out Python of their corpus.

``probe_many`` scores several SAEs at once, sharing everything that depends only on (model, hook):
1. one LM pass (collect.py) over the labelled held-out windows, capturing every hook the SAEs read,
   stopping once ``tokens`` labelled tokens are seen; the activations are kept, so each SAE's three
   passes below re-encode rows instead of rerunning the LM and the labelling;
2. per hook, on the probing sample (about ``probe_tokens`` labelled tokens drawn at random over the
   budget): the residual baselines of k-sparse probing (residual dimensions, the dense probe), TPP's
   per-class residual probes, and the first-letter words' activations and letter probes (absorption).
Then per SAE, over the kept rows: each latent's maximum (the thresholds need it) and L0; coverage
counts over all windows and precision counts over the even-numbered windows; the OR of the
high-precision latents over the odd-numbered windows (reconstruction). On the probing sample: the
SAE's own k-sparse probes and TPP ablations (probing.py, tpp.py); absorption's main latents
(absorption.py). Every SAE gets the numbers it would get probed alone (tests/test_groundtruth_many.py).

Memory: the kept activations (tokens x d_model floats per hook), one batch of latents, the count
tensors (O(P * d_sae * 10)) per SAE in turn. A transcoder is probed through its latents (read from
its input hook); the residual baselines use that input hook too; TPP and absorption are not defined.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saeforge.config import ConfigError, EvalSetup
from saeforge.evals.report import _json_safe, check_width
from saeforge.evals.saved import groundtruth_path
from saeforge.evals.setup import eval_setup_for
from saeforge.evals.splice import run_sae
from saeforge.groundtruth.absorption import first_letter_absorption, letter_words
from saeforge.groundtruth.collect import Collected, collect
from saeforge.groundtruth.labels import PROPERTIES, check_offsets
from saeforge.groundtruth.metrics import OrCounts, ThresholdCounts, coverage, reconstruction
from saeforge.groundtruth.probing import KS, k_sparse_probing, residual_baselines
from saeforge.groundtruth.tables import format_groundtruth, format_summary
from saeforge.groundtruth.tpp import tpp_all, tpp_probes
from saeforge.io import atomic_write_text
from saeforge.models import load_model, resolve_hook
from saeforge.saes.formats import load_sae, trained_architecture

DEFAULT_TOKENS = 50_000
DEFAULT_PROBE_TOKENS = 4000
NO_TPP = "TPP ablates decoder directions in the probed hook; a transcoder's decoder writes another hook"
NO_ABSORPTION = "absorption reads decoder directions in the probed hook; a transcoder's decoder writes another hook"


def models_in_turn(cfgs: list[EvalSetup]) -> Iterator[tuple[Any, list[int]]]:
    """(loaded model, indices of the ``cfgs`` that use it) for each distinct model of ``cfgs``, loaded in turn.
    The generator keeps no reference: a caller that drops its own (``del lm``) has one model in memory at a time."""
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        m = cfg.model
        groups.setdefault((m.name, m.dtype, m.device, m.random_init), []).append(i)
    for (name, dtype, device, random_init), idx in groups.items():
        yield load_model(name, dtype=dtype, device=device, random_init=random_init), idx


def probe_saved(
    sae_dir: str | Path,
    overrides: dict[str, dict] | None = None,
    tokens: int = DEFAULT_TOKENS,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    progress: bool = True,
    lm=None,
) -> tuple[dict, Path]:
    """Load the SAE and its model, run ``probe``, write the JSON; returns (result, path written)."""
    return probe_saved_many([sae_dir], overrides, tokens, probe_tokens, progress, lm)[0]


def probe_saved_many(
    sae_dirs: list,
    overrides: dict[str, dict] | None = None,
    tokens: int = DEFAULT_TOKENS,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    progress: bool = True,
    lm=None,
) -> list[tuple[dict, Path]]:
    """``probe_saved`` for SAEs of one model (``probe_many``: one LM pass); each JSON written as soon as it is scored.

    ``lm``: the loaded model; loaded from the first SAE's config when None."""
    cfgs = [eval_setup_for(d, overrides) for d in sae_dirs]
    models = {(c.model.name, c.model.random_init) for c in cfgs}
    if len(models) > 1:  # one lm serves them all: SAEs of another model would be scored on the wrong one
        raise ConfigError(
            f"probe_saved_many: the SAEs come from several models {sorted(models)}; probe each model's apart"
        )
    if lm is None:
        m = cfgs[0].model
        lm = load_model(m.name, dtype=m.dtype, device=m.device, random_init=m.random_init)
    check_offsets(lm.tokenizer, cfgs[0].model.name)  # before any work
    saes = [load_sae(d, device=str(lm.device)) for d in sae_dirs]
    written: list = [None] * len(sae_dirs)

    def save(i: int, result: dict) -> None:
        cfg = cfgs[i]
        head = {"sae": str(sae_dirs[i]), "model": cfg.model.name, "hook": cfg.model.hook, "corpus": cfg.data.corpus}
        # a BatchTopK SAE loads as the JumpReLU it is saved as: name what was trained
        result = {**head, **result, "architecture": trained_architecture(sae_dirs[i])}
        path = groundtruth_path(sae_dirs[i], cfg.data.corpus)
        atomic_write_text(path, json.dumps(_json_safe(result), indent=2) + "\n")
        written[i] = (result, path)

    probe_many(lm, list(zip(saes, cfgs)), tokens, probe_tokens, progress, on_result=save)
    return written


def probe(lm, sae, cfg: EvalSetup, tokens: int, probe_tokens: int, progress: bool = False) -> dict:
    """Coverage, reconstruction, k-sparse probing, TPP and absorption of one SAE (see the module docstring)."""
    return probe_many(lm, [(sae, cfg)], tokens, probe_tokens, progress)[0]


def probe_many(lm, saes: list, tokens: int, probe_tokens: int, progress: bool = False, on_result=None) -> list[dict]:
    """``probe`` for each (sae, cfg) of ``saes``, sharing the LM pass and the residual-only work per hook.

    SAEs whose cfg.data (corpus, split, windows) and eval.batch_size agree share one LM pass over
    every hook they read; the cfgs' models must all be ``lm``. ``on_result(i, result)`` is called as
    each SAE is scored (to save it before the next one runs); returns the results in ``saes`` order.
    """
    groups: dict[str, list[int]] = {}
    for i, (_, cfg) in enumerate(saes):
        key = json.dumps([dataclasses.asdict(cfg.data), cfg.eval.batch_size], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    results: list = [None] * len(saes)
    for idx in groups.values():
        cfg0 = saes[idx[0]][1]
        hooks = {h.name: h for h in (resolve_hook(lm.model, saes[i][1].model.hook) for i in idx)}
        data = collect(lm, list(hooks.values()), cfg0, tokens, probe_tokens, progress)
        shared = {name: _shared(data, name) for name in hooks}
        plain = [
            hooks[n] for n in hooks if any(saes[i][1].model.hook == n and not saes[i][1].model.hook_out for i in idx)
        ]
        words = letter_words(lm, plain) if plain else {}
        for i in idx:
            sae, cfg = saes[i]
            hook = hooks[resolve_hook(lm.model, cfg.model.hook).name]
            results[i] = _score(lm, sae, cfg, hook, data, shared[hook.name], words)
            if on_result is not None:
                on_result(i, results[i])
    return results


def _shared(data: Collected, hook: str) -> dict:
    """What every SAE at ``hook`` shares: the probing sample and the probes that read only the residual."""
    x_ND, y_NP, v_NP, test_N = data.sample(hook)
    return {
        "sample": (x_ND, y_NP, v_NP, test_N),
        "baselines": residual_baselines(x_ND, y_NP, v_NP, PROPERTIES, KS, test_N),
        "tpp": None,  # fitted on first use: no plain SAE at this hook (only transcoders) needs them
    }


def _score(lm, sae, cfg: EvalSetup, hook, data: Collected, shared: dict, words: dict) -> dict:
    transcoder = bool(cfg.model.hook_out)
    width = data.x[hook.name][0].shape[-1]  # a wrong model or hook fails here, naming both widths
    out_width = getattr(sae, "d_out", None) if transcoder else None
    check_width(sae, width, hook.name, lm.name, out_width, cfg.model.hook_out)

    def encode(x):
        return run_sae(sae, x.to(lm.device))[0]

    with torch.inference_mode():
        cover, ors, l0 = _counts(encode, data, hook.name)
    x_ND, y_NP, v_NP, test_N = shared["sample"]
    # outside inference mode: the probes are fitted by autograd (inference tensors would refuse it)
    probing = k_sparse_probing(x_ND, encode, y_NP, v_NP, PROPERTIES, test_N=test_N, baselines=shared["baselines"])
    if transcoder:
        tpp, absorption = {"error": NO_TPP}, {"error": NO_ABSORPTION}
    else:
        if shared["tpp"] is None:
            shared["tpp"] = tpp_probes(x_ND, y_NP, v_NP, test_N)
        tpp = tpp_all(x_ND, encode, sae.W_dec, y_NP, v_NP, test_N, probes=shared["tpp"])
        absorption = first_letter_absorption(lm, hook, sae, encode, words=words)
    stats = data.stats
    return {
        "architecture": sae.cfg.architecture,
        "d_sae": sae.d_sae,
        "l0": l0,
        "n_tokens": data.n_tokens,
        "n_windows": data.n_windows,
        "documents": {"code": stats.n_code, "prose": stats.n_prose, "unparseable": stats.n_unparseable},
        "coverage": coverage(cover, PROPERTIES),
        "reconstruction": reconstruction(ors, PROPERTIES),
        "probing": probing,
        "tpp": tpp,
        "absorption": absorption,
    }


def _counts(encode, data: Collected, hook: str) -> tuple[ThresholdCounts, OrCounts, float]:
    """The three passes over the kept rows: maxima and L0, coverage/precision counts, the OR of precise latents."""
    chunks = [(x, y, v, w) for x, y, v, w in zip(data.x[hook], data.y, data.valid, data.window) if len(x)]
    max_F, nonzero = None, 0
    for x_ND, *_ in chunks:
        f_NF = encode(x_ND).float().cpu()
        max_F = f_NF.amax(0) if max_F is None else torch.maximum(max_F, f_NF.amax(0))
        nonzero += int((f_NF != 0).sum())
    P = len(PROPERTIES)
    cover, select = ThresholdCounts(P, max_F), ThresholdCounts(P, max_F)
    for x_ND, y_NP, v_NP, w_N in chunks:
        f_NF = encode(x_ND).float().cpu()
        cover.update(f_NF, y_NP, v_NP)
        select.update(f_NF, y_NP, v_NP & (w_N % 2 == 0)[:, None])
    ors = OrCounts(select.precise_PFT(), max_F)
    for x_ND, y_NP, v_NP, w_N in chunks:
        ors.update(encode(x_ND).float().cpu(), y_NP, v_NP & (w_N % 2 == 1)[:, None])
    return cover, ors, nonzero / max(1, data.n_tokens)


__all__ = [
    "KS",
    "format_groundtruth",
    "models_in_turn",
    "format_summary",
    "groundtruth_path",
    "probe",
    "probe_many",
    "probe_saved",
    "probe_saved_many",
]

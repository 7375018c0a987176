"""``saeforge index``: stream corpus windows through the LM and SAE into a feature database.

Memory is bounded by the number of features (FeatureStats), never by the token count. Every
``checkpoint_every`` LM passes the accumulators are written to ``OUT.index-state/`` (safetensors +
JSON, each file written atomically); a killed build started again with the same arguments resumes
there. The SQLite file is built under a temporary name and renamed when whole, then the state goes.
Activations come from the LM in its dtype (model.dtype; bf16 where auto picks it), encoded by the SAE in
its own dtype; the numbers computed from weights alone (logit lens, neighbour cosines) are float32 whatever that dtype.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from saeforge.activations.stream import train_windows, window_activations
from saeforge.config import ConfigError
from saeforge.evals.setup import eval_setup_for
from saeforge.io import atomic_path, atomic_write_text
from saeforge.models import load_model, resolve_hook
from saeforge.saes.formats import load_sae, read_cfg
from saeforge.saes.hub import is_remote, local_sae_dir, output_dir
from saeforge.viewer import db, dmap, featurejson, lens
from saeforge.viewer.config import IndexConfig
from saeforge.viewer.db import DBError
from saeforge.viewer.stats import FeatureStats

STATE_SUFFIX = ".index-state"


def slug(text: str) -> str:
    """URL-safe id: the last path component, characters outside [A-Za-z0-9._-] replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(text).rstrip("/")).name).strip("-") or "x"


def default_sae_id(sae_dir: Path) -> str:
    sae_dir = sae_dir.resolve()
    # runs/NAME/sae -> NAME: the run's name says more than "sae"
    return slug(sae_dir.parent.name if sae_dir.name == "sae" else sae_dir.name)


def state_dir(out: Path) -> Path:
    return out.with_name(out.name + STATE_SUFFIX)


def _fingerprint(sae_dir: Path, cfg: IndexConfig, run_cfg: Any) -> dict[str, Any]:
    w = sae_dir / "sae_weights.safetensors"
    return {
        "sae_dir": str(sae_dir.resolve()),
        "weights_size": w.stat().st_size,
        "weights_mtime": w.stat().st_mtime_ns,
        "index": asdict(cfg),
        "model": asdict(run_cfg.model),
        "data": asdict(run_cfg.data),
    }


def _save_state(folder: Path, stats: FeatureStats, fingerprint: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors, counters = stats.state()
    with atomic_path(folder / "stats.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    # JSON last and naming the counters the tensors belong to: a crash between the two writes leaves an
    # older JSON whose n_updates does not match the tensors' file, caught below.
    atomic_write_text(
        folder / "state.json",
        json.dumps(
            {
                "fingerprint": fingerprint,
                "counters": counters,
                "tensor_bytes": (folder / "stats.safetensors").stat().st_size,
            }
        ),
    )


def _load_state(folder: Path, stats: FeatureStats, fingerprint: dict[str, Any]) -> bool:
    from safetensors.torch import load_file

    if not (folder / "state.json").exists():
        return False
    state = json.loads((folder / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise DBError(
            f"{folder} holds a partial index built with other settings or another SAE; "
            "delete it (or pass --restart) to start over, or rerun with the same options to resume"
        )
    tensors = load_file(str(folder / "stats.safetensors"))
    if (folder / "stats.safetensors").stat().st_size != state["tensor_bytes"]:
        return False  # tensors newer than the JSON: start over rather than mix two points in time
    stats.load(tensors, state["counters"])
    if stats.top_dec is None and stats.n_windows > 0:
        # the decoder-projection list would miss the windows already seen
        raise DBError(f"{folder} predates decoder-projection contexts; delete it (or pass --restart) to start over")
    return True


def build_index(
    sae_dir: str | Path,
    out: str | Path,
    cfg: IndexConfig,
    overrides: dict | None = None,
    progress: bool = True,
    restart: bool = False,
    lm=None,
) -> Path:
    """Build the feature database for ``sae_dir`` at ``out``; returns ``out``. See the module docstring."""
    from tqdm import tqdm

    # an hf:// SAE is read from the HF cache, named after its output folder, and recorded by its spec,
    # so the live viewer (viewer/live.py) finds it again through load_sae wherever the cache is
    spec, out = sae_dir, Path(out)
    sae_dir = local_sae_dir(spec)
    sae_id = default_sae_id(output_dir(spec))
    run_cfg = eval_setup_for(sae_dir, overrides)
    if lm is None:
        lm = load_model(
            run_cfg.model.name,
            dtype=run_cfg.model.dtype,
            device=run_cfg.model.device,
            random_init=run_cfg.model.random_init,
        )
    sae = load_sae(sae_dir, device=str(lm.device))
    hook = resolve_hook(lm.model, run_cfg.model.hook)
    data_cfg = run_cfg.data
    T = data_cfg.context_size
    n_windows = max(1, cfg.tokens // T)

    stats = FeatureStats(
        sae.d_sae, cfg.top_k, cfg.quantile_intervals * cfg.per_interval, cfg.left, cfg.right, cfg.hist_bins, cfg.seed
    )
    sdir = state_dir(out)
    if restart:
        shutil.rmtree(sdir, ignore_errors=True)
    fingerprint = _fingerprint(sae_dir, cfg, run_cfg)
    resumed = _load_state(sdir, stats, fingerprint)

    windows = train_windows(lm.tokenizer, data_cfg, cfg.part)
    windows = itertools.islice(windows, stats.n_windows, n_windows)  # skip what the checkpoint holds
    bar = tqdm(
        total=n_windows * T,
        initial=stats.n_windows * T,
        unit="tok",
        disable=not progress,
        desc=f"index {sae_id}" + (" (resumed)" if resumed else ""),
    )
    t0 = time.perf_counter()
    W_dec = sae.W_dec.detach()
    unit_dec_DF = (W_dec / W_dec.float().norm(dim=1, keepdim=True).clamp(min=1e-12).to(W_dec.dtype)).T
    while True:
        batch = list(itertools.islice(windows, cfg.lm_batch_size))
        if not batch:
            break
        for wa in window_activations(lm, hook, torch.stack(batch), data_cfg, cfg.lm_batch_size):
            with torch.no_grad():
                S, Tw, D = wa.acts_STD.shape
                x_ND = wa.acts_STD.to(sae.W_enc.device).reshape(-1, D)
                f_STF = sae.encode(x_ND).float().cpu().reshape(S, Tw, -1)
                # the decoder view: x . W_dec[i] / ||W_dec[i]||, the raw input (no b_dec subtracted)
                proj_STF = (x_ND.to(unit_dec_DF.dtype) @ unit_dec_DF).float().cpu().reshape(S, Tw, -1)
            stats.update(wa.tokens_ST, f_STF, wa.keep_ST, proj_STF)
        bar.update(len(batch) * T)
        if stats.n_updates % cfg.checkpoint_every == 0:
            _save_state(sdir, stats, fingerprint)
    bar.close()
    if stats.n_windows == 0:
        raise ConfigError(
            f"the {cfg.part} part of corpus {data_cfg.corpus!r} gave no windows of {T} tokens; "
            "use a larger corpus or a smaller --data.context_size"
        )

    meta = {
        "format_version": db.FORMAT_VERSION,
        "model": run_cfg.model.name,
        "model_id": slug(run_cfg.model.name),
        "sae_id": cfg.name or sae_id,
        "sae_dir": str(spec) if is_remote(spec) else str(sae_dir.resolve()),
        "hook": run_cfg.model.hook,
        "architecture": read_cfg(sae_dir).get("architecture"),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "corpus": data_cfg.corpus,
        "part": cfg.part,
        "context_size": T,
        "n_tokens": stats.n_tokens,
        "n_windows": stats.n_windows,
        "index_config": asdict(cfg),
        "data_config": asdict(data_cfg),
        "model_dtype": str(lm.dtype).replace("torch.", ""),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    write_database(out, stats, lm, sae, meta, cfg)
    shutil.rmtree(sdir, ignore_errors=True)
    return out


def write_database(out: Path, stats: FeatureStats, lm, sae, meta: dict[str, Any], cfg: IndexConfig) -> None:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = db.create(tmp)
    try:
        db.write_meta(con, meta)
        db.insert(con, "vocab", enumerate(lens.token_texts(lm.tokenizer)))
        db.insert(con, "features", _feature_rows(stats))
        db.insert(con, "contexts", _context_rows(stats, cfg))
        W_dec = sae.W_dec.detach()
        lensed = lens.logit_lens(lm.model, W_dec, cfg.n_logits)
        if lensed is not None:
            tv, ti, bv, bi = (t.tolist() for t in lensed)
            db.insert(
                con,
                "logits",
                (
                    (f, sign, r, idx[f][r], val[f][r])
                    for sign, val, idx in ((1, tv, ti), (-1, bv, bi))
                    for f in range(len(idx))
                    for r in range(len(idx[f]))
                ),
            )
        if cfg.n_neighbours > 0 and sae.d_sae > 1:
            cos, idx = (t.tolist() for t in lens.neighbours(W_dec.cpu(), cfg.n_neighbours))
            db.insert(
                con, "neighbours", ((f, r, idx[f][r], cos[f][r]) for f in range(len(idx)) for r in range(len(idx[f])))
            )
        db.create_first_position(con)
        db.insert(con, "first_position", _first_rows(stats, cfg.first_ratio))
        db.insert(con, "contexts_rest", _rest_rows(stats, cfg))
        if stats.top_dec is not None:
            db.create_decoder_view(con)
            db.insert(con, "contexts_dec", _top_rows(stats.top_dec, range(stats.F), cfg.left))
            db.insert(con, "enc_dec", _enc_dec_rows(stats))
        map_method = dmap.write_map(con, W_dec, cfg.map_method, cfg.map_clusters, cfg.seed)
        db.write_meta(con, {"logit_lens": lensed is not None, "map_method": map_method})
        db.finish(con)
        featurejson.precompute(tmp)
        os.replace(tmp, out)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)


def _feature_rows(stats: FeatureStats):
    n = max(stats.n_tokens, 1)
    count, total, mx = stats.fire_count_F.tolist(), stats.act_sum_F.tolist(), stats.max_F.tolist()
    width, hist = stats.hist_width_F.tolist(), stats.hist_FH
    for f in range(stats.F):
        h = hist[f]
        last = int(h.nonzero().max()) + 1 if count[f] else 0  # trailing empty bins carry nothing
        yield (
            f,
            count[f],
            count[f] / n,
            mx[f],
            total[f] / count[f] if count[f] else 0.0,
            width[f],
            json.dumps(h[:last].tolist()),
        )


def _first_rows(stats: FeatureStats, ratio: float):
    """(feature, max_first, max_rest, first_share, flagged): flagged when the max at the first position is
    >= ``ratio`` times the max elsewhere (a feature firing only there is flagged too)."""
    mf, mr = stats.max_first_F.tolist(), stats.max_rest_F.tolist()
    peak, wins = stats.peak_first_F.tolist(), stats.fire_windows_F.tolist()
    for f in range(stats.F):
        yield (f, mf[f], mr[f], peak[f] / wins[f] if wins[f] else 0.0, int(mf[f] > 0 and mf[f] >= ratio * mr[f]))


def _trim(tokens: list[int], acts: list[float], centre: int) -> tuple[list[int], list[float], int]:
    """Drop the -1 padding outside the window; returns the kept tokens, acts and the max's new index."""
    keep = [i for i, t in enumerate(tokens) if t >= 0]
    return [tokens[i] for i in keep], [float(f"{acts[i]:.6g}") for i in keep], keep.index(centre)


def _rest_rows(stats: FeatureStats, cfg: IndexConfig):
    """Rows of contexts_rest: the top list with the first position after BOS ignored, stored only where it
    can differ from the plain one (features with a firing window that peaks at that position)."""
    yield from _top_rows(stats.top_rest, (stats.peak_first_F > 0).nonzero().flatten().tolist(), cfg.left)


def _top_rows(kept, features, centre: int):
    """contexts-table rows (kind 'top', best first) of ``kept`` for ``features``."""
    value, window = kept.value_FK.tolist(), kept.window_FK.tolist()
    toks, acts = kept.tokens_FKL.tolist(), kept.acts_FKL.tolist()
    for f in features:
        for rank, k in enumerate(kept.ordered(f)):
            t, a, pos = _trim(toks[f][k], acts[f][k], centre)
            yield (f, "top", rank, -1, window[f][k], value[f][k], pos, t[pos], json.dumps(t), json.dumps(a))


def jaccard(a: set[int], b: set[int]) -> float | None:
    """|a & b| / |a | b|; None when both are empty (nothing to compare)."""
    return len(a & b) / len(a | b) if a | b else None


def _enc_dec_rows(stats: FeatureStats):
    """(feature, n_enc, n_dec, jaccard): overlap of the windows of the encoder's and the decoder
    projection's top lists (1 = the same contexts, 0 = none shared)."""
    for f in range(stats.F):
        enc = {int(stats.top.window_FK[f, k]) for k in stats.top.ordered(f)}
        dec = {int(stats.top_dec.window_FK[f, k]) for k in stats.top_dec.ordered(f)}
        yield (f, len(enc), len(dec), jaccard(enc, dec))


def _context_rows(stats: FeatureStats, cfg: IndexConfig):
    centre = cfg.left
    for kind, kept in (("top", stats.top), ("quantile", stats.sample)):
        value, window = kept.value_FK.tolist(), kept.window_FK.tolist()
        toks, acts = kept.tokens_FKL.tolist(), kept.acts_FKL.tolist()
        for f in range(stats.F):
            slots = kept.ordered(f)
            if kind == "top":
                order, interval = slots, [-1] * len(slots)  # already best first
            else:
                # split the uniform sample by activation into equal-count intervals, 0 = weakest
                order = sorted(slots, key=lambda k: value[f][k])
                q = cfg.quantile_intervals
                interval = [min(q - 1, i * q // max(len(order), 1)) for i in range(len(order))]
            for rank, (k, iv) in enumerate(zip(order, interval)):
                t, a, pos = _trim(toks[f][k], acts[f][k], centre)
                yield (f, kind, rank, iv, window[f][k], value[f][k], pos, t[pos], json.dumps(t), json.dumps(a))

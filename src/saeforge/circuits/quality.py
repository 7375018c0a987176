"""The quality of a transcoder set as a whole: per-layer EV and L0, and the CE/KL of the full replacement model.

Given per-layer transcoders (``saeforge transcoders``) or a cross-layer transcoder (``saeforge clt``) and the
held-out windows of a corpus (the split evals use), two streamed passes:

1. **Per layer** (``--eval.tokens``): each layer's MLP input and output from one clean forward; the prediction
   y_hat_m (a CLT sums the decoders of every layer l <= m, each fed layer l's clean MLP input) against the real
   MLP output y_m, with ``evals.metrics.ReconstructionStats``: explained variance
   1 - E||y - y_hat||^2 / (E||y||^2 - ||E y||^2) in float64, FVU = 1 - EV, L0 of that layer's latents, dead latents.
2. **Replacement model** (``--eval.ce_tokens``): forwards per batch, all with the same windows:
   - clean;
   - *full replacement*: every MLP output replaced at once by its prediction, no error terms. Each layer's
     latents are read from the MLP input of this same forward, so errors compound through the layers (a CLT's
     layer m sums its decoders from layers l <= m, each fed the replacement model's own layer-l input), as in
     circuit-tracer's replacement model;
   - *zero*: every MLP output zeroed at once (the CE score's baseline);
   - *mean* (``eval_cfg.mean_ablation``): every MLP output replaced at once by its mean over pass 1's kept tokens
     (SPECS' second baseline, as `saeforge eval` reports it for one hook);
   - and, with ``layers_alone``, for each layer m: only m replaced (earlier layers are clean, so a CLT's
     layer m then reads clean inputs), and only m zeroed: 2 L more forwards.

   CE score = (CE_zero - CE_repl) / (CE_zero - CE_clean); KL(p_clean || p_repl) summed over the vocabulary,
   averaged over scored predictions; KL score = (KL_zero - KL_repl) / KL_zero. For one layer alone the CE
   score is the one `saeforge eval` gives for that layer's transcoder (zero = that layer's MLP zeroed).

Excluded positions (BOS, EOS, pad) keep the MLP output the model computes in that forward, and predictions
are scored as in ``evals.splice`` (source and target both not excluded). Memory: the clean logits and one
variant's, plus each layer's latents as sparse tensors during a forward (a CLT's later layers need them).

``with_errors`` (a check, not a metric) adds one more variant: the full replacement plus each layer's error
e_m = y_m - y_hat_m recorded on the clean forward. That is the clean model again (KL 0), which proves the
latents are read and the predictions written at the right places.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from saeforge.circuits.clt import CrossLayerTranscoder
from saeforge.circuits.replacement import CrossLayer, PerLayer
from saeforge.circuits.transcoders import HOOK_IN, HOOK_OUT, TranscoderSet
from saeforge.config import ConfigError, DataConfig, EvalConfig
from saeforge.data import excluded_mask
from saeforge.evals.metrics import ReconstructionStats
from saeforge.evals.report import heldout_windows
from saeforge.evals.splice import ce_kl_sums, recovery_scores, scored_positions
from saeforge.models.hooks import capture, patched, resolve_hook

FORMAT_VERSION = 1
RESULT = "replacement.json"


class Predictor:
    """Latents and predictions of a PLT set or a CLT, in float32 on the LM's device (the transcoders move there).

    ``features(l, x_ND)`` gives layer l's latents (dense f_NF); ``predict(m, feats, x_ND)`` sums the decoders
    into layer m from ``feats`` = {l: sparse f_NF} for l <= m, adds b_dec and (PLT) the skip term.
    """

    def __init__(self, lm, transcoders: TranscoderSet | CrossLayerTranscoder | dict) -> None:
        if isinstance(transcoders, CrossLayerTranscoder):
            self.mlps: PerLayer | CrossLayer = CrossLayer(transcoders, lm.n_layers, lm.d_model)
            self.kind, self.d_sae = "clt", transcoders.cfg.d_sae
        else:
            self.mlps = PerLayer(transcoders, lm.n_layers, lm.d_model)
            self.kind, self.d_sae = "plt", self.mlps.saes[0].d_sae
        self.mlps.to(lm.device)
        self.n_layers, self.device = lm.n_layers, lm.device

    def features(self, layer: int, x_ND: Tensor) -> Tensor:
        return self.mlps.encode(layer, x_ND.to(self.device, torch.float32))

    def predict(self, dst: int, feats: dict[int, Tensor], x_ND: Tensor) -> Tensor:
        y_hat_ND = self.mlps.b_dec(dst).expand(x_ND.shape[0], -1)
        for src in range(dst + 1):
            W_FD = self.mlps.decoder(src, dst)
            if W_FD is not None:
                y_hat_ND = y_hat_ND + torch.sparse.mm(feats[src], W_FD)
        return self.mlps.skip(dst, y_hat_ND, x_ND.to(self.device, torch.float32))


def _batches(lm, data_cfg: DataConfig, n_windows: int, batch_size: int) -> Iterator[Tensor]:
    it = islice(heldout_windows(lm, data_cfg), n_windows)
    while chunk := list(islice(it, batch_size)):
        yield torch.stack(chunk)


@torch.inference_mode()
def layer_stats(
    lm, pred: Predictor, data_cfg: DataConfig, eval_cfg: EvalConfig
) -> tuple[list[dict[str, Any]], dict[int, Tensor]]:
    """Pass 1: each layer's EV / FVU / L0 / dead latents against its real MLP output (clean inputs), and each
    layer's mean MLP output over the kept tokens (float32 [D], the mean-ablation baseline)."""
    L = pred.n_layers
    points = [resolve_hook(lm.model, HOOK_IN.format(layer=m)) for m in range(L)]
    points += [resolve_hook(lm.model, HOOK_OUT.format(layer=m)) for m in range(L)]
    stats = [ReconstructionStats(lm.d_model, pred.d_sae, eval_cfg.dense_threshold) for _ in range(L)]
    n_windows = math.ceil(eval_cfg.tokens / data_cfg.context_size)
    for tokens_ST in _batches(lm, data_cfg, n_windows, eval_cfg.batch_size):
        acts = capture(lm.model, points, tokens_ST)
        keep_ST = ~excluded_mask(tokens_ST, lm.tokenizer, data_cfg).to(lm.device)
        feats: dict[int, Tensor] = {}
        for m in range(L):
            x_ND = acts[points[m].name][keep_ST].float()
            f_NF = pred.features(m, x_ND)
            feats[m] = f_NF.to_sparse()
            y_hat_ND = pred.predict(m, feats, x_ND)
            stats[m].update(acts[points[L + m].name][keep_ST].float(), y_hat_ND, f_NF)
    rows, means = [], {}
    for m, s in enumerate(stats):
        r = s.result()
        means[m] = r["mean_x"].float()
        rows.append(
            {"layer": m, "explained_variance": r["explained_variance"], "fvu": 1.0 - r["explained_variance"],
             "l0": r["l0"], "mse": r["mse"], "dead_fraction": r["dead_fraction"], "n_tokens": r["n_tokens"]}
        )  # fmt: skip
    return rows, means


class _Splice:
    """Forward hooks on every MLP: record inputs (and latents), replace outputs of ``replace`` layers by their
    predictions and of ``fill`` layers by a constant vector (zeros, means)."""

    def __init__(self, lm, pred: Predictor) -> None:
        self.lm, self.pred = lm, pred
        self.ins = [resolve_hook(lm.model, HOOK_IN.format(layer=m)) for m in range(pred.n_layers)]
        self.outs = [resolve_hook(lm.model, HOOK_OUT.format(layer=m)) for m in range(pred.n_layers)]

    def run(
        self,
        tokens_ST: Tensor,
        keep_ST: Tensor,
        replace: Collection[int] = (),
        fill: dict[int, Tensor] | None = None,
        errors: dict[int, Tensor] | None = None,
        record_errors: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """Logits [S, T, V]. ``errors``: {m: e_ND} added to replaced layers; ``record_errors``: filled with the
        errors of this forward (y - y_hat at kept positions, every layer; give it on the clean run)."""
        pred, feats, xs = self.pred, {}, {}
        need = max([*replace, -1]) if record_errors is None else pred.n_layers - 1  # latents needed up to here

        def read(m: int):
            def fn(x_STD: Tensor) -> None:
                if m <= need:
                    xs[m] = x_STD[keep_ST].float()
                    feats[m] = pred.features(m, xs[m]).to_sparse()

            return fn

        def write(m: int):
            def fn(y_STD: Tensor) -> Tensor | None:
                if record_errors is not None:
                    record_errors[m] = y_STD[keep_ST].float() - pred.predict(m, feats, xs[m])
                if fill is not None and m in fill:
                    new_ND = fill[m].to(y_STD.device).expand(int(keep_ST.sum()), -1)
                elif m in replace:
                    new_ND = pred.predict(m, feats, xs[m])
                    if errors is not None:
                        new_ND = new_ND + errors[m]
                else:
                    return None
                out_STD = y_STD.clone()
                out_STD[keep_ST] = new_ND.to(y_STD.dtype)
                return out_STD

            return fn

        fns = {p: read(m) for m, p in enumerate(self.ins)}
        fns.update({p: write(m) for m, p in enumerate(self.outs)})  # different HookPoints: in before out
        with patched(self.lm.model, fns):
            return self.lm.model(input_ids=tokens_ST, use_cache=False).logits


@torch.inference_mode()
def replacement_ce_kl(
    lm,
    pred: Predictor,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    layers_alone: bool = True,
    with_errors: bool = False,
    means: dict[int, Tensor] | None = None,
) -> dict[str, Any]:
    """Pass 2: CE/KL of the full replacement model, of all MLPs zeroed (and, given ``means``, mean-ablated), and
    (``layers_alone``) of each layer alone."""
    L, splice = pred.n_layers, _Splice(lm, pred)
    zeros = {m: torch.zeros(lm.d_model) for m in range(L)}
    variants: dict[str, dict] = {"replacement": {"replace": set(range(L))}, "zero": {"fill": zeros}}
    if means is not None:
        variants["mean"] = {"fill": means}
    if layers_alone:
        for m in range(L):
            variants[f"layer{m}"] = {"replace": {m}}
            variants[f"layer{m}_zero"] = {"fill": {m: zeros[m]}}
    if with_errors:
        variants["with_errors"] = {"replace": set(range(L))}  # errors filled in per batch below
    ce = dict.fromkeys(["clean", *variants], 0.0)
    kl = dict.fromkeys(variants, 0.0)
    n_pred = n_seq = 0
    n_windows = math.ceil(eval_cfg.ce_tokens / data_cfg.context_size)
    for tokens_ST in _batches(lm, data_cfg, n_windows, eval_cfg.batch_size):
        tokens_ST = tokens_ST.to(lm.device)
        excluded_ST = excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
        s_idx, t_idx = scored_positions(excluded_ST)
        n_seq += tokens_ST.shape[0]
        if len(s_idx) == 0:
            continue
        targets_N = tokens_ST[s_idx, t_idx + 1]
        n_pred += len(s_idx)
        errors: dict[int, Tensor] | None = {} if with_errors else None
        logits_clean = splice.run(tokens_ST, ~excluded_ST, record_errors=errors)
        for i, (name, spec) in enumerate(variants.items()):
            logits_new = splice.run(tokens_ST, ~excluded_ST, errors=errors if name == "with_errors" else None, **spec)
            ce_clean, ce_new, kl_new = ce_kl_sums(logits_clean, logits_new, s_idx, t_idx, targets_N)
            del logits_new
            ce[name] += ce_new
            kl[name] += kl_new
            if i == 0:
                ce["clean"] += ce_clean
    if n_pred == 0:
        raise ConfigError(
            "no scored predictions in the held-out windows: use a corpus with more held-out text (--data.corpus, "
            "--data.holdout_fraction) or raise --eval.ce_tokens"
        )
    ce = {k: v / n_pred for k, v in ce.items()}
    kl = {k: v / n_pred for k, v in kl.items()}

    def score(name: str, zero: str) -> dict[str, float]:
        ce_score, kl_score = recovery_scores(ce[name], kl[name], ce[zero], kl[zero], ce["clean"])
        return {"ce": ce[name], "kl": kl[name], "ce_zero": ce[zero], "kl_zero": kl[zero],
                "ce_score": ce_score, "kl_score": kl_score}  # fmt: skip

    out: dict[str, Any] = {"ce_clean": ce["clean"], "n_predictions": n_pred, "n_sequences": n_seq,
                           "full": score("replacement", "zero")}  # fmt: skip
    if means is not None:
        mean_scores = recovery_scores(ce["replacement"], kl["replacement"], ce["mean"], kl["mean"], ce["clean"])
        out["full"].update({"ce_mean": ce["mean"], "kl_mean": kl["mean"],
                            "ce_score_mean": mean_scores[0], "kl_score_mean": mean_scores[1]})  # fmt: skip
    if layers_alone:
        out["alone"] = [{"layer": m, **score(f"layer{m}", f"layer{m}_zero")} for m in range(L)]
    if with_errors:
        out["with_errors"] = {"ce": ce["with_errors"], "kl": kl["with_errors"]}
    return out


def transcoder_quality(
    lm,
    transcoders: TranscoderSet | CrossLayerTranscoder | dict,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    layers_alone: bool = True,
    with_errors: bool = False,
) -> dict[str, Any]:
    """Per-layer EV / L0 and the full replacement model's CE / KL / CE score on held-out windows (module docstring).

    ``transcoders``: a TranscoderSet (``load_transcoders``), {layer: transcoder SAE}, or a CLT (``load_clt``);
    it must have one transcoder per layer of ``lm``, each d_model -> d_model (TranscoderSetError otherwise).
    Returns a JSON-ready dict (`saeforge transcoder-eval` writes it as replacement.json); ``format_quality``
    makes the table. The transcoders are moved to ``lm``'s device in place. ``eval_cfg.mean_ablation`` adds the
    mean-ablation baseline to ``full`` (one more forward per CE batch).
    """
    pred = Predictor(lm, transcoders)
    folder = transcoders.folder if isinstance(transcoders, TranscoderSet) else None
    result: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": lm.name,
        "kind": pred.kind,
        "transcoders": None if folder is None else str(folder),
        "corpus": data_cfg.corpus,
        "context_size": data_cfg.context_size,
        "tokens_requested": eval_cfg.tokens,
        "ce_tokens_requested": eval_cfg.ce_tokens,
        "baseline": "ce_zero / kl_zero: every MLP output zeroed at once (one layer's, for 'alone'); ce_mean / "
        "kl_mean: every MLP output replaced at once by its mean over the per-layer pass's tokens; excluded positions (BOS, EOS, pad) keep their real MLP output in every variant",
    }
    result["layers"], means = layer_stats(lm, pred, data_cfg, eval_cfg)
    result["l0_total"] = sum(r["l0"] for r in result["layers"])
    means = means if eval_cfg.mean_ablation else None
    result.update(replacement_ce_kl(lm, pred, data_cfg, eval_cfg, layers_alone, with_errors, means))
    return result


def format_quality(r: dict[str, Any]) -> str:
    """The result as a plain-text table: one row per layer, then the full replacement model."""
    alone = {a["layer"]: a for a in r.get("alone", [])}
    lines = [
        f"{r['kind'].upper()} set on {r['model']}, held-out part of {r['corpus']!r}: "
        f"{r['layers'][0]['n_tokens']:,} tokens per layer, {r['n_predictions']:,} predictions for CE/KL",
        f"{'layer':>5} {'EV':>8} {'FVU':>8} {'L0':>8} {'dead':>7}" + (" {:>9} {:>9} {:>9}".format(
            "CE alone", "KL alone", "CE score") if alone else ""),
    ]  # fmt: skip
    for row in r["layers"]:
        line = (
            f"{row['layer']:>5} {row['explained_variance']:8.4f} {row['fvu']:8.4f} {row['l0']:8.2f} "
            f"{row['dead_fraction']:7.2%}"
        )
        a = alone.get(row["layer"])
        if a is not None:
            line += f" {a['ce']:9.4f} {a['kl']:9.4f} {a['ce_score']:9.4f}"
        lines.append(line)
    f = r["full"]
    lines += [
        f"full replacement (every MLP replaced, no error terms): CE {f['ce']:.4f} (clean {r['ce_clean']:.4f}, every "
        f"MLP zeroed {f['ce_zero']:.4f}), CE score {f['ce_score']:.4f}, KL {f['kl']:.4f} (zeroed {f['kl_zero']:.4f}), "
        f"KL score {f['kl_score']:.4f}"
        + (f"; vs mean ablation: CE {f['ce_mean']:.4f}, CE score {f['ce_score_mean']:.4f}" if "ce_mean" in f else "")
        + f"; total L0 {r['l0_total']:.1f}"
    ]
    return "\n".join(lines)

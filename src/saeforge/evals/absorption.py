"""Feature absorption on the first-letter task: a simplified version of SAEBench's, exactly as computed here.

This is what `saeforge eval --report` shows (one multinomial probe, "any main latent fires" F1). SAEBench's
full task, with per-letter probes, the F1-jump splitting rule, the full-absorption rate and the absorption
fraction, is groundtruth/absorption.py, run by `saeforge probe`.

1. Tokens: vocabulary entries that decode to an optional single leading space plus 2+ ASCII letters
   (" apple", "Token"); label = first letter, lower-cased (26 classes). At most ``per_letter`` per letter,
   picked by a seeded shuffle; letters with fewer than ``min_per_letter`` tokens are dropped.
2. Activations: the LM reads [BOS, token] (just [token] without a BOS) and x is the hook's activation
   at the token position. Tokens split 75/25 into train/test by the seeded shuffle.
3. Probe: one multinomial logistic regression over the letters on train x (standardised inside,
   Adam, ``probe_steps`` full-batch steps, weight decay 1e-4). p_L = the probe's direction for letter L
   mapped back to raw-activation space, unit-normalised. (SAEBench trains one binary probe per letter.)
4. Main latents of letter L (k-sparse probing, simplified): latents ranked by mean activation on L's
   train tokens minus mean on the others; the classifier "any of the top k fires" is scored by F1 on
   train; k grows from 1 while F1 improves by more than ``min_f1_gain`` (0.03), up to ``max_k`` (5).
5. On each test token of letter L that the probe classifies correctly: it is a *miss* when none of
   L's main latents fires; it is *absorbed* when it is a miss and some firing latent j has
   cos(W_dec[j], p_L) >= 0.025 and f_j * (W_dec[j] . p_L) >= 0.4 * (x . p_L) (it carries at least 40%
   of the probe projection; tokens with x . p_L <= 0 are never absorbed).
   absorption_rate(L) = absorbed / probe-correct test tokens of L; reported per letter and as the mean
   over letters, with the miss rate beside it.
"""

from __future__ import annotations

import re
import string
from typing import Any

import torch

from saeforge.evals.splice import run_sae
from saeforge.models.hooks import capture

WORD = re.compile(r"^ ?[A-Za-z]{2,}$")
COS_MIN, PROJ_FRACTION = 0.025, 0.4


def first_letter_tokens(
    tokenizer, per_letter: int = 120, min_per_letter: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [N], letter index 0..25 [N]) of single-word vocabulary tokens; see step 1."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g).tolist()
    by_letter: dict[int, list[int]] = {c: [] for c in range(26)}
    for j in order:
        text = tokenizer.decode([ids[j]])
        if WORD.match(text) and text.strip()[0].isascii():
            c = string.ascii_lowercase.index(text.strip()[0].lower())
            if len(by_letter[c]) < per_letter:
                by_letter[c].append(ids[j])
    kept = [(i, c) for c, lst in by_letter.items() if len(lst) >= min_per_letter for i in lst]
    if len(kept) < 2 * min_per_letter:
        raise ValueError(
            f"first-letter absorption needs single-word tokens for at least two letters; this "
            f"tokenizer's vocabulary has {len(kept)} usable ones"
        )
    perm = torch.randperm(len(kept), generator=g)
    return torch.tensor([kept[p][0] for p in perm]), torch.tensor([kept[p][1] for p in perm])


@torch.inference_mode()
def token_activations(lm, hook, ids_N: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    bos = lm.tokenizer.bos_token_id
    out = []
    for a in range(0, len(ids_N), batch_size):
        tok = ids_N[a : a + batch_size, None]
        if bos is not None:
            tok = torch.cat([torch.full_like(tok, bos), tok], 1)
        out.append(capture(lm.model, [hook], tok.to(lm.device))[hook.name][:, -1].float().cpu())
    return torch.cat(out)


def train_probe(x_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int, steps: int = 300, seed: int = 0):
    """(unit probe directions p_CD in raw-activation space, the probe, mean, std) of a standardised
    multinomial logistic regression; the probe classifies (x - mean) / std."""
    mu, sd = x_ND.mean(0), x_ND.std(0).clamp(min=1e-6)
    z = (x_ND - mu) / sd
    torch.manual_seed(seed)
    lin = torch.nn.Linear(z.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(z), y_N).backward()
            opt.step()
    W_CD = lin.weight.detach() / sd  # w . (x - mu) / sd = (w / sd) . x + const
    return W_CD / W_CD.norm(dim=1, keepdim=True), lin, mu, sd


def _f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    tp = float((pred & true).sum())
    return 2 * tp / max(1.0, float(pred.sum() + true.sum()))


def main_latents(f_NF: torch.Tensor, is_L_N: torch.Tensor, max_k: int = 5, min_f1_gain: float = 0.03) -> list[int]:
    """Step 4: top latents by mean-activation difference, grown while F1 of 'any fires' improves."""
    diff_F = f_NF[is_L_N].mean(0) - f_NF[~is_L_N].mean(0)
    ranked = diff_F.argsort(descending=True)[:max_k].tolist()
    chosen, best = [ranked[0]], _f1((f_NF[:, ranked[0]] > 0), is_L_N)
    for j in ranked[1:]:
        f1 = _f1((f_NF[:, chosen + [j]] > 0).any(1), is_L_N)
        if f1 - best <= min_f1_gain:
            break
        chosen, best = chosen + [j], f1
    return chosen


def absorption_scores(
    sae,
    x_ND: torch.Tensor,
    y_N: torch.Tensor,
    n_train: int,
    probe_steps: int = 300,
    max_k: int = 5,
    min_f1_gain: float = 0.03,
) -> dict[str, Any]:
    """Steps 3-5 on activations ``x_ND`` with letters ``y_N``; the first ``n_train`` rows train probe and main latents."""
    n_classes = int(y_N.max()) + 1
    x_ND = x_ND.clone()  # a normal tensor: inference-mode tensors cannot be saved for the probe's backward
    p_CD, lin, mu, sd = train_probe(x_ND[:n_train], y_N[:n_train], n_classes, probe_steps)
    with torch.no_grad():
        f_NF, _ = run_sae(sae, x_ND)
        f_NF = f_NF.float().cpu()
        pred_N = lin((x_ND - mu) / sd).argmax(1)
    W_dec_FD = sae.W_dec.detach().float().cpu()
    cos_FC = (W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True).clamp(min=1e-12)) @ p_CD.T
    per_letter: dict[str, dict[str, Any]] = {}
    test = torch.arange(len(y_N)) >= n_train
    for c in range(n_classes):
        if int((y_N[:n_train] == c).sum()) == 0:
            continue
        mains = main_latents(f_NF[:n_train], y_N[:n_train] == c, max_k, min_f1_gain)
        rows = (test & (y_N == c) & (pred_N == c)).nonzero()[:, 0]
        miss = absorbed = 0
        for r in rows.tolist():
            if (f_NF[r, mains] > 0).any():
                continue
            miss += 1
            proj = float(x_ND[r] @ p_CD[c])
            contrib_F = f_NF[r] * (W_dec_FD @ p_CD[c])
            carriers = (f_NF[r] > 0) & (cos_FC[:, c] >= COS_MIN) & (contrib_F >= PROJ_FRACTION * proj)
            absorbed += int(proj > 0 and bool(carriers.any()))
        n = len(rows)
        per_letter[string.ascii_lowercase[c]] = {
            "main_latents": mains,
            "probe_correct": n,
            "miss_rate": miss / n if n else None,
            "absorption_rate": absorbed / n if n else None,
        }
    scored = [v for v in per_letter.values() if v["probe_correct"]]
    return {
        "absorption_rate": sum(v["absorption_rate"] for v in scored) / max(1, len(scored)),
        "miss_rate": sum(v["miss_rate"] for v in scored) / max(1, len(scored)),
        "probe_test_accuracy": float((pred_N[test] == y_N[test]).double().mean()),
        "n_tokens": len(y_N),
        "n_train": n_train,
        "letters": per_letter,
    }


def first_letter_absorption(
    lm, hook, sae, per_letter: int = 120, seed: int = 0, probe_steps: int = 300
) -> dict[str, Any]:
    """The whole task for ``sae`` at ``hook`` (a HookPoint) of ``lm``; see the module docstring."""
    ids_N, y_N = first_letter_tokens(lm.tokenizer, per_letter, seed=seed)
    x_ND = token_activations(lm, hook, ids_N)
    return absorption_scores(sae, x_ND, y_N, n_train=int(0.75 * len(y_N)), probe_steps=probe_steps)

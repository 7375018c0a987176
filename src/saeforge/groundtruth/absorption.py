"""SAEBench's first-letter absorption (Chanin et al. 2024, with Till's absorption fraction), as computed here.

evals/absorption.py is the simplified version `saeforge eval --report` shows; this is the full one
`saeforge probe` runs. Steps, with where this differs from SAEBench (sae_bench/evals/absorption):

1. Words: vocabulary tokens that decode to an optional leading space plus 2+ ASCII letters (SAEBench
   allows 1 letter: a lone letter's first letter is the token itself), at most ``per_letter`` per
   letter by a seeded shuffle (evals.absorption.first_letter_tokens). A seeded 80/20 train/test split.
2. Activations: the prompt ``[BOS] word " has the first letter:"`` (SAEBench's template; SAEBench also
   prepends up to 10 in-context examples, left out here), x = the hook's activation at the word token.
3. Ground-truth probes: one binary logistic regression per letter on train x (probing.fit_logistic:
   float64 L-BFGS, balanced class weights, L2 1e-4; SAEBench: one multi-probe trained by Adam). p_L is
   probe L's weight in raw-activation units, unit-normalised. Letters whose probe's test F1 is below
   ``MIN_PROBE_F1`` (0.6, SAEBench's min_GT_probe_f1) are reported but left out of the means.
4. Main latents (k-sparse probing, feature splitting): latents ranked by mean(f | L) - mean(f | not L)
   on train (signed: only latents that predict L; SAEBench ranks by an L1 probe's weights), a balanced
   logistic regression on the top k, F1 on test, k = 1 .. ``max_k`` (10). The main latents are the top k
   for the largest k reached while each step improves F1 by more than ``f1_jump`` (0.03) over the best
   so far; more than one main latent is feature splitting.
5. Per test word of letter L that probe L classifies positive (a probe true positive), with
   a = x . p_L and c_j = f_j * (W_dec[j] . p_L), latent j's share of the projection in raw units
   (SAEBench uses f_j * cos(W_dec[j], p_L): the same when decoder rows are unit-norm, and here
   folded input scaling leaves them not so):
   - full absorption: every main latent is off (f < 1e-8), a > 0, and the latent with the largest c_j
     has cos(W_dec[j], p_L) >= 0.025 and c_j >= 0.4 a;
   - absorption fraction: m = sum of c over main latents; absorbers = other latents with
     cos >= 0.1 and c > 0, their top 3 summing to s. 0 when m >= a or s < 0.4 a (or a <= 0); 1 when
     m <= 0; else min(s, a - m) / (min(s, a - m) + m).
   Per letter: full_absorption_rate = full absorptions / probe true positives, absorption_fraction =
   the fractions' sum / probe true positives; the scores are their means over letters.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import torch

from saeforge.evals.absorption import first_letter_tokens
from saeforge.groundtruth.probing import fit_logistic, probe_weights
from saeforge.models.hooks import capture

SUFFIX = " has the first letter:"
F1_JUMP, MAX_K, MIN_PROBE_F1 = 0.03, 10, 0.6
COS_FULL, COS_FRACTION, PROJ_FRACTION, MAX_ABSORBERS, EPS = 0.025, 0.1, 0.4, 3, 1e-8


def prompt_activations(lm, hook, ids_N: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """x_ND: the hook's activation at the word of ``[BOS] word SUFFIX`` for each token id."""
    return prompt_activations_many(lm, [hook], ids_N, batch_size)[hook.name]


@torch.inference_mode()
def prompt_activations_many(lm, hooks: list, ids_N: torch.Tensor, batch_size: int = 128) -> dict:
    """``prompt_activations`` for several hooks in one LM pass: hook name -> x_ND."""
    suffix = lm.tokenizer.encode(SUFFIX, add_special_tokens=False)
    bos = lm.tokenizer.bos_token_id
    head = [] if bos is None else [bos]
    out: dict[str, list] = {h.name: [] for h in hooks}
    for a in range(0, len(ids_N), batch_size):
        word = ids_N[a : a + batch_size, None]
        tok = torch.cat(
            [torch.tensor(head).expand(len(word), -1).long(), word, torch.tensor(suffix).expand(len(word), -1)], 1
        )
        acts = capture(lm.model, hooks, tok.to(lm.device))
        for h in hooks:
            out[h.name].append(acts[h.name][:, len(head)].float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def _f1(pred_PN: torch.Tensor, true_PN: torch.Tensor) -> torch.Tensor:
    tp = (pred_PN & true_PN).double().sum(-1)
    return 2 * tp / (pred_PN.double().sum(-1) + true_PN.double().sum(-1)).clamp_min(1)


def _balanced(y_PN: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    pos, neg = (y_PN & rows_N).double(), (~y_PN & rows_N).double()
    return pos / pos.sum(1, keepdim=True).clamp_min(1) + neg / neg.sum(1, keepdim=True).clamp_min(1)


def main_latents(f_NF, y_LN, test_N, max_k: int = MAX_K, f1_jump: float = F1_JUMP):
    """Step 4: (main latents per letter, test F1 per letter and k [L, max_k])."""
    train_N = ~test_N
    f = f_NF.double()
    pos, neg = (y_LN & train_N).double(), (~y_LN & train_N).double()
    diff_LF = pos @ f / pos.sum(1, keepdim=True).clamp_min(1) - neg @ f / neg.sum(1, keepdim=True).clamp_min(1)
    top_LK = diff_LF.topk(min(max_k, f.shape[1]), dim=1).indices
    K = top_LK.shape[1]
    # every (letter, k) in one fit: the k-feature problem pads to K with zero columns, which keep weight 0
    X = torch.cat([torch.nn.functional.pad(f[:, top_LK[:, :k]].permute(1, 0, 2), (0, K - k)) for k in range(1, K + 1)])
    y = y_LN.repeat(K, 1)
    predict = fit_logistic(X, y, _balanced(y, train_N), max_iter=200)
    f1_LK = _f1((predict(X) > 0) & test_N, y & test_N).reshape(K, -1).T
    mains = []
    for L in range(len(y_LN)):
        best, chosen = -100.0, []
        for k in range(K):
            if f1_LK[L, k] <= best + f1_jump:
                break
            best, chosen = float(f1_LK[L, k]), top_LK[L, : k + 1].tolist()
        mains.append(chosen)
    return mains, f1_LK


def _scores(
    a: float, c_F: torch.Tensor, cos_F: torch.Tensor, f_F: torch.Tensor, mains: list[int]
) -> tuple[bool, float]:
    """Step 5 for one word: (full absorption?, absorption fraction)."""
    top = int(c_F.argmax())
    off = bool((f_F[mains] < EPS).all())
    full = off and a > 0 and float(cos_F[top]) >= COS_FULL and float(c_F[top]) >= PROJ_FRACTION * a
    m = float(c_F[mains].sum())
    others = torch.ones_like(cos_F, dtype=torch.bool)
    others[mains] = False
    cand = c_F[others & (cos_F >= COS_FRACTION) & (c_F > 0)]
    s = float(cand.topk(min(MAX_ABSORBERS, len(cand))).values.sum())
    if a <= 0 or m >= a or s < PROJ_FRACTION * a:
        return full, 0.0
    if m <= 0:
        return full, 1.0
    absorbed = min(s, a - m)
    return full, min(1.0, max(0.0, absorbed / (absorbed + m)))


def letter_probes(x_ND: torch.Tensor, y_N: torch.Tensor, test_N: torch.Tensor) -> tuple:
    """Step 3: (letters, y_LN, probe logits_LN, probe test F1_L, unit probe directions p_LD in x's units)."""
    letters = sorted(set(y_N.tolist()))
    y_LN = torch.stack([y_N == c for c in letters])
    probe = fit_logistic(x_ND, y_LN, _balanced(y_LN, ~test_N))
    with torch.no_grad():
        logit_LN = probe(x_ND)
    probe_f1_L = _f1((logit_LN > 0) & test_N, y_LN & test_N)
    w_LD = probe_weights(probe, x_ND.shape[1], len(letters))
    p_LD = (w_LD / w_LD.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    return letters, y_LN, logit_LN, probe_f1_L, p_LD


def absorption_full(
    x_ND: torch.Tensor,
    y_N: torch.Tensor,
    test_N: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    W_dec_FD: torch.Tensor,
    max_k: int = MAX_K,
    f1_jump: float = F1_JUMP,
    probes: tuple | None = None,
) -> dict:
    """Steps 3-5 on activations ``x_ND`` with letter indices ``y_N`` (0..25); ``test_N`` marks test rows.

    ``probes``: ``letter_probes`` of the same rows (step 3 reads only the residual), when SAEs share them."""
    letters, y_LN, logit_LN, probe_f1_L, p_LD = letter_probes(x_ND, y_N, test_N) if probes is None else probes
    with torch.no_grad():
        f_NF = encode(x_ND).float().cpu()
    mains, f1_LK = main_latents(f_NF, y_LN, test_N, max_k, f1_jump)
    W = W_dec_FD.detach().float().cpu()
    proj_LF = p_LD @ W.T  # W_dec[j] . p_L
    cos_LF = proj_LF / W.norm(dim=1).clamp_min(1e-12)
    per: dict[str, dict] = {}
    for j, c in enumerate(letters):
        rows = (test_N & y_LN[j] & (logit_LN[j] > 0)).nonzero()[:, 0].tolist()
        full = frac = miss = 0.0
        for r in rows:
            a = float(x_ND[r].float() @ p_LD[j])
            is_full, fraction = _scores(a, f_NF[r] * proj_LF[j], cos_LF[j], f_NF[r], mains[j])
            full, frac = full + is_full, frac + fraction
            miss += bool((f_NF[r, mains[j]] < EPS).all())
        n = len(rows)
        per[string.ascii_lowercase[c]] = {
            "probe_f1": float(probe_f1_L[j]),
            "probe_true_positives": n,
            "main_latents": mains[j],
            "split": len(mains[j]) > 1,
            "f1_by_k": [round(float(v), 4) for v in f1_LK[j]],
            "main_f1": float(f1_LK[j, len(mains[j]) - 1]),
            "full_absorption_rate": full / n if n else None,
            "absorption_fraction": frac / n if n else None,
            "miss_rate": miss / n if n else None,
        }
    scored = [v for v in per.values() if v["probe_true_positives"] and v["probe_f1"] >= MIN_PROBE_F1]

    def mean(key):
        return sum(v[key] for v in scored) / len(scored) if scored else None

    return {
        "full_absorption": mean("full_absorption_rate"),
        "absorption_fraction": mean("absorption_fraction"),
        "split_letters": sum(v["split"] for v in scored),
        "mean_main_latents": (sum(len(v["main_latents"]) for v in scored) / len(scored)) if scored else None,
        "main_f1": mean("main_f1"),  # low: the letter has no latent of its own, and "absorbed" means little
        "letters_scored": len(scored),
        "n_tokens": len(y_N),
        "n_test": int(test_N.sum()),
        "letters": per,
    }


def letter_words(lm, hooks: list, per_letter: int = 100, seed: int = 0) -> dict:
    """Steps 1-3 for each hook, in one LM pass over the prompts: hook name -> (x_ND, y_N, test_N, probes),
    or {"error": why} when the vocabulary is too small (a result to report, not a failure of the run)."""
    try:
        ids_N, y_N = first_letter_tokens(lm.tokenizer, per_letter, seed=seed)
    except ValueError as e:
        return {"error": str(e)}
    test_N = torch.zeros(len(y_N), dtype=torch.bool)
    test_N[torch.randperm(len(y_N), generator=torch.Generator().manual_seed(seed + 1))[: len(y_N) // 5]] = True
    x = prompt_activations_many(lm, hooks, ids_N)
    # normal tensors: the probes' autograd refuses inference ones
    return {h.name: (x[h.name].clone(), y_N, test_N, letter_probes(x[h.name].clone(), y_N, test_N)) for h in hooks}


def first_letter_absorption(lm, hook, sae, encode, per_letter: int = 100, seed: int = 0, words=None) -> dict:
    """The whole task for ``sae`` at ``hook`` of ``lm``, or {"error": why} when the vocabulary is too small.

    ``words``: ``letter_words(lm, [hook, ...])``, when several SAEs share it."""
    words = letter_words(lm, [hook], per_letter, seed) if words is None else words
    if "error" in words:
        return {"error": words["error"]}
    x_ND, y_N, test_N, probes = words[hook.name]
    return absorption_full(x_ND, y_N, test_N, encode, sae.W_dec, probes=probes)


def format_absorption(result: dict) -> str:
    """A row per letter and the mean, as ``saeforge probe`` prints them."""
    if "letters" not in result:
        return f"absorption: - ({result.get('error', 'not run')})"

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [["letter", "probe F1", "TP", "main latents", "main F1", "full abs", "abs frac", "miss"]]
    for name, v in result["letters"].items():
        rows.append(
            [
                name,
                fmt(v["probe_f1"]),
                str(v["probe_true_positives"]),
                ",".join(map(str, v["main_latents"])),
                fmt(v["main_f1"]),
            ]
            + [fmt(v["full_absorption_rate"]), fmt(v["absorption_fraction"]), fmt(v["miss_rate"])]
        )
    rows.append(
        [
            "mean",
            "",
            "",
            fmt(result["mean_main_latents"]),
            fmt(result["main_f1"]),
            fmt(result["full_absorption"]),
            fmt(result["absorption_fraction"]),
            "",
        ]
    )
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = [
        "  ".join(v.ljust(w) if j in (0, 3) else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))) for r in rows
    ]
    lines.append(
        f"first-letter absorption (SAEBench): full {fmt(result['full_absorption'])}, fraction "
        f"{fmt(result['absorption_fraction'])}, main latents' F1 {fmt(result['main_f1'])}, over {result['letters_scored']} letters with probe F1 >= {MIN_PROBE_F1}; "
        f"{result['split_letters']} split; {result['n_tokens']} words, {result['n_test']} tested"
    )
    return "\n".join(lines)

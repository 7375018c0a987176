"""Steering on the real model: does adding a feature raise the logits of its logit-lens top tokens?

SmolLM2-135M (float32, CPU) + the demo SAE (runs/demo-smollm2-topk/sae, TopK k=32, 4608 latents at
blocks.3.hook_resid_post). For a seeded sample of live features, steer at the last position of a
few neutral prompts (error term kept) and measure, at that position:
  top    mean change of the logits of the feature's logit-lens top-10 tokens,
  bottom the same for its bottom-10 tokens,
  vocab  mean change over the whole vocabulary (the shift every token gets),
  rank   median rank of the top-10 tokens before -> after.
"lift" = top - vocab: the part of the rise specific to the feature's own tokens.
Then: attribution patching vs true zero ablation (Spearman) on one prompt, with timings, and one
generation example. Run: .venv/bin/python bench/steering_smollm2.py [--sae DIR] [--features N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saeforge.analysis.ablation import ablation_effects
from saeforge.analysis.attribution import attribution_patching
from saeforge.analysis.common import load_for_analysis, prompt_ids
from saeforge.analysis.logit_lens import direction_logits_V
from saeforge.analysis.metrics import LogitDiff, spearman
from saeforge.analysis.steering import Steer, steer_generate, steered_logits
from saeforge.saes.formats import load_sparsity

PROMPTS = [
    "The weather today is",
    "My favourite thing to do is",
    "He opened the door and saw",
    "In the beginning there was",
    "The report says that",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="runs/demo-smollm2-topk/sae")
    ap.add_argument("--features", type=int, default=12)
    ap.add_argument("--alphas", default="4,8,16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    lm, sae, hook = load_for_analysis(args.sae)
    print(f"loaded {lm.name} + SAE ({sae.d_sae} latents at {hook}) in {time.perf_counter() - t0:.1f} s")
    sparsity_F = load_sparsity(args.sae)
    live = (sparsity_F > -4).nonzero().squeeze(1) if sparsity_F is not None else torch.arange(sae.d_sae)
    feats = live[
        torch.randperm(len(live), generator=torch.Generator().manual_seed(args.seed))[: args.features]
    ].tolist()
    alphas = [float(a) for a in args.alphas.split(",")]
    ids = [prompt_ids(lm.tokenizer, p) for p in PROMPTS]
    print(
        f"{len(feats)} live features (log10 freq > -4) drawn with seed {args.seed}; steering at the last position "
        f"of {len(PROMPTS)} prompts; decoder row norm {float(sae.W_dec.norm(dim=1).mean()):.2f} (latent units x this "
        f"= residual norm added; residual norm at the last position ~{_resid_norm(lm, hook, ids):.0f})"
    )

    summary = {a: [] for a in alphas}
    print(
        f"\n{'feature':>7} {'alpha':>5} {'top':>7} {'bottom':>7} {'vocab':>7} {'lift':>7} {'rank before->after':>20}  top tokens"
    )
    t0 = time.perf_counter()
    for feat in feats:
        lens_V = direction_logits_V(lm, sae.W_dec[feat])
        top_K, bot_K = lens_V.topk(10).indices, (-lens_V).topk(10).indices
        words = " ".join(repr(lm.tokenizer.decode([int(i)])) for i in top_K[:4])
        for a in alphas:
            d_top, d_bot, d_voc, r0, r1 = [], [], [], [], []
            for ids_1T in ids:
                clean, steered = steered_logits(lm, sae, hook, [Steer(feat, alpha=a, positions="last")], ids_1T)
                c_V, s_V = clean[0, -1].float(), steered[0, -1].float()
                d_V = s_V - c_V
                d_top.append(float(d_V[top_K].mean()))
                d_bot.append(float(d_V[bot_K].mean()))
                d_voc.append(float(d_V.mean()))
                r0.append(float(_ranks(c_V, top_K).median()))
                r1.append(float(_ranks(s_V, top_K).median()))
            top, bot, voc = (statistics.mean(v) for v in (d_top, d_bot, d_voc))
            summary[a].append((top - voc, bot - voc))
            print(
                f"{feat:>7} {a:>5g} {top:>7.2f} {bot:>7.2f} {voc:>7.2f} {top - voc:>7.2f} "
                f"{statistics.median(r0):>9.0f} -> {statistics.median(r1):<8.0f}  {words}"
            )
    n_fwd = len(feats) * len(alphas) * len(PROMPTS) * 2
    print(f"({n_fwd} forwards in {time.perf_counter() - t0:.1f} s)")

    print("\nsummary over features (lift = top-10 change - vocab-mean change; bottom-10 likewise)")
    for a in alphas:
        lifts = [x for x, _ in summary[a]]
        drops = [y for _, y in summary[a]]
        up = sum(x > 0 for x in lifts)
        print(
            f"  alpha {a:>4g}: mean lift {statistics.mean(lifts):+.2f}, median {statistics.median(lifts):+.2f}, "
            f"top tokens rose more than the vocab for {up}/{len(lifts)} features; "
            f"bottom-10 mean {statistics.mean(drops):+.2f}"
        )

    _attribution_check(lm, sae, hook)
    t0 = time.perf_counter()
    feat = max(feats, key=lambda f: max(x for x, _ in [summary[alphas[-1]][feats.index(f)]]))
    r = steer_generate(lm, sae, feat, alphas[-1], "The weather today is", hook=hook, max_new_tokens=20)
    print(f"\ngeneration, feature {feat} alpha {alphas[-1]:g} at all positions ({time.perf_counter() - t0:.1f} s):")
    print(f"  clean:   {r.clean!r}\n  steered: {r.steered!r}")


def _ranks(logits_V: torch.Tensor, ids_K: torch.Tensor) -> torch.Tensor:
    """Rank (0 = highest logit) of each token in ids_K."""
    return (logits_V[None, :] > logits_V[ids_K][:, None]).sum(1).float()


def _resid_norm(lm, hook, ids) -> float:
    from saeforge.models import capture

    return statistics.mean(float(capture(lm.model, [hook], i)[hook][0, -1].norm()) for i in ids)


def _attribution_check(lm, sae, hook) -> None:
    prompt = "The capital of France is"
    tok = lm.tokenizer
    paris, london = (tok(s, add_special_tokens=False)["input_ids"][0] for s in (" Paris", " London"))
    metric = LogitDiff(paris, london)
    t0 = time.perf_counter()
    atp = attribution_patching(lm, sae, hook, prompt, metric)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    true = ablation_effects(lm, sae, hook, prompt, metric)
    t_abl = time.perf_counter() - t0
    active = true.scores_F != 0
    rho = spearman(atp.scores_F[active], true.scores_F[active])
    top_true = set(f for f, _ in true.ranked(10))
    top_atp = set(f for f, _ in atp.ranked(10))
    print(f"\nattribution on {prompt!r}, metric logit[' Paris'] - logit[' London'] = {atp.metric_clean:.2f}:")
    print(
        f"  attribution patching {t_atp:.2f} s; true zero ablation of {int(active.sum())} active features {t_abl:.1f} s"
    )
    print(
        f"  Spearman(AtP, true ablation) over active features = {rho:.3f}; top-10 overlap {len(top_true & top_atp)}/10"
    )


if __name__ == "__main__":
    main()

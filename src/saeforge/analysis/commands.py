"""`saeforge steer` and `saeforge attribute` (plugged into cli.py through COMMAND_MODULES).

Both load the SAE folder, and the model and hook named in its cfg.json unless --model / --hook say
otherwise. Heavy imports happen inside the commands so `saeforge --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from saeforge.analysis.ablation import ablation_effects
from saeforge.analysis.attribution import attribution_patching, integrated_gradients
from saeforge.analysis.common import load_for_analysis, single_token
from saeforge.analysis.counterfactual import flip_preference
from saeforge.analysis.logit_lens import top_tokens
from saeforge.analysis.metrics import LogitDiff, NextTokenLoss, TokenLogit
from saeforge.analysis.steering import Steer, steer_generate

METHODS = ("atp", "ig", "zero-ablation", "mean-ablation")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sae",
        required=True,
        metavar="DIR",
        help="SAE folder (cfg.json + sae_weights.safetensors) or hf://OWNER/REPO[/PATH][@REV]",
    )
    p.add_argument("--model", help="model to load (default: metadata.model_name in the SAE's cfg.json)")
    p.add_argument("--hook", help="hook to splice at (default: metadata.hook_name in the SAE's cfg.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def add_commands(sub: Any, arch: str) -> None:
    s = sub.add_parser(
        "steer",
        help="generate with and without steering SAE features",
        description="Adds alpha x W_dec[feature] (or clamps the feature) at the SAE's hook, keeping the "
        "SAE's error term, and prints greedy generations without and with the edit.",
    )
    _common(s)
    s.add_argument("--feature", type=int, action="append", required=True, help="latent index (repeat for several)")
    s.add_argument(
        "--alpha", type=float, action="append", help="added activation, latent units (one, or one per --feature)"
    )
    s.add_argument(
        "--clamp", type=float, action="append", help="set the activation to this value instead of adding alpha"
    )
    s.add_argument("--positions", default="all", help="all | last | fires:N | fires:N>T (default: all)")
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples from --seed")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    s.set_defaults(func=cmd_steer)

    a = sub.add_parser(
        "attribute",
        help="rank SAE features by their effect on a metric (attribution / ablation)",
        description="Scores every feature's contribution to a metric: logit[target] - logit[other] at the "
        "last position (or logit[target] alone), or next-token loss with --loss. "
        "With --counterfactual, finds the fewest features whose values on that prompt flip "
        "the preference target vs other.",
    )
    _common(a)
    a.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several; scores are averaged)")
    a.add_argument("--target", help="completion whose logit the metric measures (one token, e.g. ' Paris')")
    a.add_argument("--other", help="competing completion: metric = logit[target] - logit[other]")
    a.add_argument("--loss", action="store_true", help="metric = mean next-token loss over the prompt instead")
    a.add_argument(
        "--method", choices=METHODS, default="atp", help="atp (grad x activation, default), ig, or a true ablation"
    )
    a.add_argument("--steps", type=int, default=16, help="integrated-gradients steps (default: 16)")
    a.add_argument("--top", type=int, default=20, help="rows in the table (default: 20)")
    a.add_argument("--counterfactual", help="prompt B of the same token length: find features that flip the preference")
    a.set_defaults(func=cmd_attribute)


def _load(ns: argparse.Namespace):
    lm, sae, hook = load_for_analysis(ns.sae, ns.model, device=ns.device)
    if ns.hook:
        hook = sae.hook_name = ns.hook
    return lm, sae, hook


def _steers(ns: argparse.Namespace) -> list:
    n = len(ns.feature)
    if ns.clamp and ns.alpha:
        raise SystemExit("saeforge steer: give --alpha or --clamp, not both")
    values = ns.clamp or ns.alpha
    if not values:
        raise SystemExit("saeforge steer: give --alpha A (added activation) or --clamp V (activation set to V)")
    if len(values) not in (1, n):
        raise SystemExit(f"saeforge steer: {n} --feature but {len(values)} values; give one value or one per feature")
    values = values * n if len(values) == 1 else values
    if ns.clamp:
        return [Steer(f, clamp=v, positions=ns.positions) for f, v in zip(ns.feature, values)]
    return [Steer(f, alpha=v, positions=ns.positions) for f, v in zip(ns.feature, values)]


def cmd_steer(ns: argparse.Namespace, base: dict) -> int:
    lm, sae, hook = _load(ns)
    steers = _steers(ns)
    res = steer_generate(
        lm,
        sae,
        steers,
        prompt=ns.prompt,
        hook=hook,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
    )
    for s in steers:
        edit = f"clamp to {s.clamp:g}" if s.clamp is not None else f"alpha {s.alpha:+g}"
        norm = float(sae.W_dec[s.feature].norm())
        print(f"feature {s.feature}: {edit} at {s.positions} (decoder row norm {norm:.3g}) at {hook}")
    print(f"prompt:  {res.prompt!r}")
    print(f"clean:   {res.clean!r}")
    print(f"steered: {res.steered!r}")
    return 0


def _metric(ns: argparse.Namespace, tok: Any):
    if ns.loss:
        if ns.target or ns.other or ns.counterfactual:
            raise SystemExit(
                "saeforge attribute: --loss measures the prompt's own loss; drop --target/--other/--counterfactual"
            )
        return NextTokenLoss(start=1)
    if not ns.target:
        raise SystemExit("saeforge attribute: give --target ' token' (and --other ' token'), or --loss")
    target = single_token(tok, ns.target)
    if ns.other:
        return LogitDiff(target, single_token(tok, ns.other))
    if ns.counterfactual:
        raise SystemExit("saeforge attribute: --counterfactual needs --target and --other (the two completions)")
    return TokenLogit(target)


def cmd_attribute(ns: argparse.Namespace, base: dict) -> int:
    lm, sae, hook = _load(ns)
    metric = _metric(ns, lm.tokenizer)
    if ns.counterfactual:
        return _flip(ns, lm, sae, hook, metric)
    if ns.method == "atp":
        res = attribution_patching(lm, sae, hook, ns.prompt, metric)
    elif ns.method == "ig":
        res = integrated_gradients(lm, sae, hook, ns.prompt, metric, steps=ns.steps)
    else:
        res = ablation_effects(lm, sae, hook, ns.prompt, metric, mode=ns.method.split("-")[0])
    print(
        f"{res.method} of {metric.name} at {hook}; metric on the prompts: {res.metric_clean:.4g}"
        + (f", all features at baseline: {res.metric_baseline:.4g}" if res.metric_baseline is not None else "")
    )
    print("score = estimated metric(clean) - metric(feature removed); ranked by |score|")
    print(f"{'rank':>4}  {'feature':>7}  {'score':>10}  logit-lens top tokens")
    for rank, (feat, score) in enumerate(res.ranked(ns.top), 1):
        _, toks = top_tokens(lm, sae, feat, k=4)
        print(f"{rank:>4}  {feat:>7}  {score:>10.4g}  {' | '.join(repr(t) for t in toks)}")
    return 0


def _flip(ns: argparse.Namespace, lm: Any, sae: Any, hook: str, metric: Any) -> int:
    if len(ns.prompt) != 1:
        raise SystemExit("saeforge attribute --counterfactual takes exactly one --prompt (prompt A)")
    r = flip_preference(lm, sae, hook, ns.prompt[0], ns.counterfactual, metric.target, metric.other)
    print(
        f"preference {metric.name}: A {r.metric_a:.4g}, B {r.metric_b:.4g}, "
        f"A with every feature from B {r.metric_all:.4g}"
    )
    if not r.flipped:
        print("no flip found within the first 64 features ranked by attribution")
        return 1
    print(
        f"flipped by substituting {len(r.features)} feature(s) (greedy needed {r.greedy_size}, pruned after): "
        f"{r.features}; preference on A becomes {r.metric_after:.4g}"
    )
    return 0

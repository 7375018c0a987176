"""Using features: splice SAEs into the LM (keeping the error term), steer, ablate, attribute.

    common.py       load an SAE with its model and hook; prompt ids, single tokens
    prompts.py      prompts as token ids, the positions an analysis may edit, forwards with splices
    logit_lens.py   which tokens a decoder direction pushes up when read out directly
    splice.py       Splice / spliced(): x' = x + (f' - f) @ W_dec at one or more hooks
    steering.py     Steer edits (add alpha, clamp; all / last / where a feature fires), generation
    metrics.py      metrics of a forward pass: logit difference, next-token loss
    ablation.py     zero / mean ablation of features, ranked by their effect on a metric
    attribution.py  attribution patching, integrated gradients, feature-to-feature attribution
    counterfactual.py  smallest feature substitution that flips a preference between two completions
    commands.py     `saeforge steer`, `saeforge attribute`

Submodules are imported on use, so `import saeforge.analysis` stays cheap.
"""

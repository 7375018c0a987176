"""Ablation, attribution patching, integrated gradients, feature-to-feature and counterfactual flips."""

from __future__ import annotations

import pytest
import torch
from test_analysis_splice import HOOK, make_sae

from saeforge.analysis.ablation import ablation_effects
from saeforge.analysis.attribution import attribution_patching, feature_to_feature, integrated_gradients
from saeforge.analysis.counterfactual import _prefs, flip_preference
from saeforge.analysis.logit_lens import direction_logits_V
from saeforge.analysis.metrics import LogitDiff, NextTokenLoss, spearman
from saeforge.analysis.prompts import as_prompts, forward_logits, record_latents
from saeforge.analysis.splice import Splice
from saeforge.models import load_model

PROMPTS = ["def add(a, b):", "The quick brown fox jumps"]


@pytest.fixture(scope="module")
def lms(tiny_model_dirs):
    return {fam: load_model(str(d), device="cpu") for fam, d in tiny_model_dirs.items()}


def test_spearman_hand_values():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-1.0, -5.0, -6.0, -9.0])) == pytest.approx(-1.0)
    # ties take the mean rank: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> 0.8660
    assert spearman(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.75**0.5)


def test_ablation_effect_matches_a_direct_forward(lms):
    lm, sae = lms["llama"], make_sae()
    metric = LogitDiff(10, 20)
    zero = ablation_effects(lm, sae, HOOK, PROMPTS, metric)
    mean_F = torch.rand(96, generator=torch.Generator().manual_seed(0))
    mean = ablation_effects(lm, sae, HOOK, PROMPTS, metric, mode="mean", mean_F=mean_F, features=[3, 17])
    ps = as_prompts(lm, PROMPTS)
    for feat in (int(zero.scores_F.abs().argmax()), 3, 17):
        for mode, res in (("zero", zero), ("mean", mean)):
            if mode == "mean" and feat not in (3, 17):
                continue
            value = 0.0 if mode == "zero" else float(mean_F[feat])
            want = 0.0
            for p in ps:

                def edit(f_STF, state, feat=feat, value=value):
                    g = f_STF.clone()
                    g[:, 1:, feat] = value  # position 0 is BOS: left alone
                    return g

                with torch.no_grad():
                    clean = metric(forward_logits(lm, p.ids_1T)[0], p.ids_1T)
                    abl = metric(forward_logits(lm, p.ids_1T, [Splice(sae, HOOK, edits=[edit])])[0], p.ids_1T)
                want += float(clean - abl) / len(ps)
            assert float(res.scores_F[feat]) == pytest.approx(want, abs=1e-5)
    # features never active have exactly zero zero-ablation effect; unrequested mean features are not run
    inactive = sum((record_latents(lm, sae, HOOK, p)[0, 1:] > 0).any(0) for p in ps) == 0
    assert inactive.any() and torch.count_nonzero(zero.scores_F[inactive]) == 0
    assert torch.count_nonzero(mean.scores_F) <= 2
    assert zero.ranked(3)[0][0] == int(zero.scores_F.abs().argmax())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_attribution_patching_ranks_true_ablation_effects(lms, family):
    lm, sae = lms[family], make_sae()
    for metric in (LogitDiff(10, 20), NextTokenLoss(start=1)):
        atp = attribution_patching(lm, sae, HOOK, PROMPTS, metric)
        true = ablation_effects(lm, sae, HOOK, PROMPTS, metric)
        active = true.scores_F != 0
        assert int(active.sum()) >= 30
        rho = spearman(atp.scores_F[active], true.scores_F[active])
        assert rho >= 0.8, f"{family} {metric.name}: Spearman {rho:.3f}"
        assert atp.metric_clean == pytest.approx(true.metric_clean, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_integrated_gradients_completeness(lms, family):
    lm, sae = lms[family], make_sae()
    metric, prompt = LogitDiff(10, 20), PROMPTS[1]
    ig = integrated_gradients(lm, sae, HOOK, prompt, metric, steps=64, batch=32)
    # the path's far end, computed independently: every feature zeroed after BOS, error term kept
    p = as_prompts(lm, prompt)[0]

    def zero_all(f_STF, state):
        g = f_STF.clone()
        g[:, 1:] = 0
        return g

    with torch.no_grad():
        m0 = float(metric(forward_logits(lm, p.ids_1T, [Splice(sae, HOOK, edits=[zero_all])])[0], p.ids_1T))
    assert ig.metric_baseline == pytest.approx(m0, abs=1e-6)
    total = ig.metric_clean - m0
    err = abs(float(ig.scores_F.sum()) - total)
    assert abs(total) > 0.02
    assert err < 1e-3 * max(abs(total), 0.1)
    # the regime is nonlinear: first-order scores and a 2-step path miss the total by far more
    atp_err = abs(float(attribution_patching(lm, sae, HOOK, prompt, metric).scores_F.sum()) - total)
    ig2_err = abs(float(integrated_gradients(lm, sae, HOOK, prompt, metric, steps=2).scores_F.sum()) - total)
    assert atp_err > 20 * err and ig2_err > 20 * err


@pytest.mark.slow
def test_feature_to_feature_ranks_true_downstream_effects(lms):
    lm = lms["llama"]
    up, down = make_sae(seed=1), make_sae("relu", seed=2)
    hu, hd = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
    js, scores_JF = feature_to_feature(lm, (up, hu), (down, hd), PROMPTS[:1], top=3)
    assert scores_JF.shape == (3, 96)
    p = as_prompts(lm, PROMPTS[:1])[0]
    f_up = record_latents(lm, up, hu, p)[0, 1:]
    active = (f_up > 0).any(0).nonzero().squeeze(1)
    base_J = record_latents(lm, down, hd, p)[0, 1:, js].sum(0)
    for j in range(3):
        true = []
        for i in active.tolist():

            def edit(f_STF, state, i=i):
                g = f_STF.clone()
                g[:, 1:, i] = 0
                return g

            with torch.no_grad():
                _, (_, st) = forward_logits(lm, p.ids_1T, [Splice(up, hu, edits=[edit]), Splice(down, hd, record=True)])
            true.append(float(base_J[j] - st.f_STF[0, 1:, js[j]].sum()))
        rho = spearman(scores_JF[j, active], torch.tensor(true))
        assert rho >= 0.8, f"downstream feature {int(js[j])}: Spearman {rho:.3f}"
    with pytest.raises(ValueError, match="upstream hook must come earlier"):
        feature_to_feature(lm, (down, hd), (up, hu), PROMPTS[:1], top=2)


def test_counterfactual_flip_is_real_and_one_minimal(lms):
    lm, sae = lms["llama"], make_sae()
    a, b = "The quick brown fox", "The lazy brown dog"
    r = flip_preference(lm, sae, HOOK, a, b, 10, 20)
    assert r.flipped and 1 <= len(r.features) <= r.greedy_size
    assert (r.metric_a > 0) != (r.metric_after > 0)
    pa, pb = as_prompts(lm, [a, b])
    f_b = record_latents(lm, sae, HOOK, pb)
    metric = LogitDiff(10, 20)
    # every single feature: does it alone flip? (the search's answer must be no larger than needed)
    singles = torch.eye(96, dtype=torch.bool)
    flips = (_prefs(lm, sae, HOOK, pa, metric, f_b, singles, 96) > 0) != (r.metric_a > 0)
    if len(r.features) > 1:
        assert not flips.any()
        for feat in r.features:  # 1-minimal: dropping any one undoes the flip
            row = torch.zeros(1, 96, dtype=torch.bool)
            row[0, [c for c in r.features if c != feat]] = True
            assert (float(_prefs(lm, sae, HOOK, pa, metric, f_b, row, 1)[0]) > 0) == (r.metric_a > 0)
    else:
        assert flips[r.features[0]]
    with pytest.raises(ValueError, match="same length"):
        flip_preference(lm, sae, HOOK, a, "The dog", 10, 20)


def test_logit_lens_uses_the_final_norm_weight(lms):
    lm = lms["llama"]
    norm = lm.model.model.norm
    with torch.no_grad():
        old = norm.weight.clone()
        norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
        u = torch.randn(64, generator=torch.Generator().manual_seed(0))
        got = direction_logits_V(lm, u)
        norm.weight.copy_(old)
    want = lm.model.get_output_embeddings().weight @ (u * torch.linspace(0.5, 2.0, 64))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

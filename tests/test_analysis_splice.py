"""Splicing with the error term and steering edits, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from saeforge.analysis.splice import Splice, spliced
from saeforge.analysis.steering import Steer, steer_edit, steer_generate
from saeforge.models import HookError, load_model, patched
from saeforge.saes.registry import config_class, sae_class

HOOK = "blocks.1.hook_resid_post"


def make_sae(arch: str = "topk", d_sae: int = 96, seed: int = 0, scale: float = 3.0):
    """A random SAE whose decoder rows have norm ~``scale`` (the tiny models' residuals have norm ~0.3)."""
    kw = {"k": 8} if arch == "topk" else {}
    sae = sae_class(arch)(config_class(arch)(d_in=64, d_sae=d_sae, **kw))
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_dec.mul_(scale / sae.W_dec.norm(dim=1, keepdim=True))
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def lms(tiny_model_dirs):
    return {fam: load_model(str(d), device="cpu") for fam, d in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def ids_ST():
    return torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(lm, ids_ST, splices=()):
    with torch.no_grad(), spliced(lm, list(splices)) as states:
        return lm.model(input_ids=ids_ST, use_cache=False).logits, states


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_transparent_splices_reproduce_clean_logits_exactly(lms, ids_ST, family):
    lm = lms[family]
    clean, _ = logits(lm, ids_ST)
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", HOOK, "blocks.2.hook_mlp_out"]
    splices = [Splice(make_sae("topk" if i % 2 else "relu", seed=i), h, record=True) for i, h in enumerate(hooks)]
    # plus alpha = 0 and a clamp to each latent's own value: edits that change nothing
    splices.append(
        Splice(
            make_sae(),
            HOOK,
            edits=[steer_edit(make_sae(), [Steer(5, alpha=0.0), Steer(7, alpha=0.0, positions="last")])],
        )
    )
    out, states = logits(lm, ids_ST, splices)
    assert torch.equal(out, clean)
    for st in states[:4]:
        assert st.calls == 1 and st.f_STF.shape == (2, 10, 96)
    # the SAE alone reconstructs badly (random weights): a splice without the error term would change the logits
    sae = splices[2].sae
    with torch.no_grad(), patched(lm, {HOOK: lambda x_STD: sae(x_STD.reshape(-1, 64)).reshape(x_STD.shape)}):
        bare = lm.model(input_ids=ids_ST, use_cache=False).logits
    assert (bare - clean).abs().max() > 1e-2


def _hook_delta(lm, ids_ST, sae, steers, hook=HOOK):
    """(x' - x at the hook [S, T, D], clean latents [S, T, F]) for a steering edit."""
    seen = {}

    def record(x_STD):
        seen.setdefault("x", []).append(x_STD.clone())

    with torch.no_grad():
        with patched(lm, {hook: record}):
            lm.model(input_ids=ids_ST, use_cache=False)
        # hooks run in registration order: the recorder registered after the splice sees x'
        with (
            spliced(lm, [Splice(sae, hook, edits=[steer_edit(sae, steers)], record=True)]) as (st,),
            patched(lm, {hook: record}),
        ):
            lm.model(input_ids=ids_ST, use_cache=False)
    return seen["x"][1] - seen["x"][0], st.f_STF


def test_add_and_clamp_move_x_along_the_decoder_row_at_the_chosen_positions(lms, ids_ST):
    lm, sae = lms["llama"], make_sae()
    W = sae.W_dec
    d, _ = _hook_delta(lm, ids_ST, sae, [Steer(5, alpha=2.5)])
    torch.testing.assert_close(d, (2.5 * W[5]).expand_as(d), atol=1e-5, rtol=1e-5)
    d, _ = _hook_delta(lm, ids_ST, sae, [Steer(5, alpha=-1.0, positions="last")])
    torch.testing.assert_close(d[:, -1], (-W[5]).expand(2, -1), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(d[:, :-1]) == 0
    # two features at once, one of them clamped: x moves by 1*W[3] + (4 - f_9) * W[9]
    d, f = _hook_delta(lm, ids_ST, sae, [Steer(3, alpha=1.0), Steer(9, clamp=4.0)])
    want = W[3] + (4.0 - f[..., 9:10]) * W[9]
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)


def test_condition_feature_limits_steering_to_where_it_fires(lms, ids_ST):
    lm, sae = lms["llama"], make_sae()
    _, f = _hook_delta(lm, ids_ST, sae, [Steer(0, alpha=0.0)])
    counts_F = (f > 0).float().sum((0, 1))
    cond = int((counts_F - f.shape[0] * f.shape[1] / 2).abs().argmin())  # fires on about half the positions
    fires_ST = f[..., cond] > 0
    assert 0 < int(fires_ST.sum()) < fires_ST.numel()
    d, _ = _hook_delta(lm, ids_ST, sae, [Steer(11, alpha=2.0, positions=f"fires:{cond}")])
    moved_ST = d.abs().sum(-1) > 0
    assert torch.equal(moved_ST, fires_ST)
    torch.testing.assert_close(d[fires_ST], (2.0 * sae.W_dec[11]).expand(int(fires_ST.sum()), -1), atol=1e-5, rtol=1e-5)
    # a threshold above every activation steers nowhere
    d, _ = _hook_delta(lm, ids_ST, sae, [Steer(11, alpha=2.0, positions=f"fires:{cond}>1e9")])
    assert torch.count_nonzero(d) == 0


def test_upstream_edit_reaches_downstream_sae(lms, ids_ST):
    lm = lms["gpt2"]
    up, down = make_sae(seed=1), make_sae("relu", seed=2)
    _, (_, st0) = logits(
        lm, ids_ST, [Splice(up, "blocks.0.hook_resid_post"), Splice(down, "blocks.2.hook_resid_post", record=True)]
    )
    _, (_, st1) = logits(
        lm,
        ids_ST,
        [
            Splice(up, "blocks.0.hook_resid_post", edits=[steer_edit(up, [Steer(4, alpha=3.0, positions="last")])]),
            Splice(down, "blocks.2.hook_resid_post", record=True),
        ],
    )
    diff_ST = (st1.f_STF - st0.f_STF).abs().sum(-1)
    # causal attention: only the last position (the edited one) can change downstream
    assert torch.count_nonzero(diff_ST[:, :-1]) == 0 and bool((diff_ST[:, -1] > 1e-3).all())


def test_errors_name_the_range_and_the_widths(lms, ids_ST):
    lm, sae = lms["llama"], make_sae(d_sae=96)
    with pytest.raises(IndexError, match=r"feature 96 is out of range: this SAE has 96 latents \(0..95\)"):
        steer_edit(sae, [Steer(96, alpha=1.0)])
    with pytest.raises(IndexError, match="feature -1 is out of range"):
        steer_edit(sae, [Steer(-1, alpha=1.0)])
    with pytest.raises(IndexError, match="feature 500 is out of range"):
        steer_edit(sae, [Steer(0, alpha=1.0, positions="fires:500")])
    with pytest.raises(ValueError, match="expected 'all', 'last', 'fires:N'"):
        Steer(0, alpha=1.0, positions="first")
    with pytest.raises(ValueError, match="alpha or clamp, not both"):
        Steer(0, alpha=1.0, clamp=2.0)
    sae.hook_name = HOOK
    # mlp_in of the tiny llama is 64 wide, but the 128-wide MLP hidden layer is not
    with pytest.raises(HookError, match=r"width d_in=64.*trained on 'blocks.1.hook_resid_post'"):
        logits(lm, ids_ST, [Splice(sae, "model.layers.1.mlp.up_proj")])


def test_steer_generate_greedy_alpha_zero_is_a_noop_and_large_alpha_changes_text(lms):
    lm, sae = lms["llama"], make_sae()
    r0 = steer_generate(lm, sae, 5, 0.0, "def add(a, b):", hook=HOOK, max_new_tokens=8)
    assert r0.clean == r0.steered and len(r0.clean) > 0
    r1 = steer_generate(lm, sae, 5, 40.0, "def add(a, b):", hook=HOOK, max_new_tokens=8)
    r2 = steer_generate(lm, sae, 5, 40.0, "def add(a, b):", hook=HOOK, max_new_tokens=8)
    assert r1.clean == r0.clean and r1.steered != r1.clean
    assert (r1.clean, r1.steered) == (r2.clean, r2.steered)  # greedy: deterministic
    several = steer_generate(
        lm, sae, [Steer(5, alpha=40.0), Steer(6, alpha=0.0)], prompt="def add(a, b):", hook=HOOK, max_new_tokens=8
    )
    assert several.steered == r1.steered
    with pytest.raises(ValueError, match="pass hook="):
        steer_generate(lm, make_sae(), 5, 1.0, "x")

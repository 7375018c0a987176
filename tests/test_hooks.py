"""Hook points on tiny random Llama / GPT-2 / GPT-NeoX models, checked against hand-computed forwards."""

import pytest
import tiny
import torch
from torch import nn

from saeforge.models.hooks import HOOK_KINDS, HookError, HookPoint, capture, list_hooks, patched, resolve_hook

# family -> (final norm, block path, pre-MLP norm inside the block); used for the manual forwards.
MANUAL = {
    "llama": ("model.norm", "model.layers", "post_attention_layernorm"),
    "gpt2": ("transformer.ln_f", "transformer.h", "ln_2"),
    "gpt_neox": ("gpt_neox.final_layer_norm", "gpt_neox.layers", "post_attention_layernorm"),
}
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {fam: tiny.make_model(fam, len(tiny_tokenizer)) for fam in tiny.FAMILIES}


@pytest.fixture(scope="module")
def ids_ST(tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, len(tiny_tokenizer), (2, 9), generator=g)


def hook_ids(model):
    # transformers 5 installs permanent output-recording hooks on first use, so compare against a snapshot.
    return {(n, k) for n, m in model.named_modules() for k in (*m._forward_hooks, *m._forward_pre_hooks)}


def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_list_hooks_names_every_layer_and_kind(models):
    names = list_hooks(models["llama"])
    assert len(names) == tiny.N_LAYERS * len(HOOK_KINDS) == 15
    assert names[:5] == [f"blocks.0.hook_{k}" for k in ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")]
    assert names[-1] == "blocks.2.hook_mlp_out"


def test_resid_hooks_match_output_hidden_states(tiny_family, models, ids_ST):
    model = models[tiny_family]
    n = tiny.N_LAYERS
    names = [f"blocks.{L}.hook_resid_pre" for L in range(n)] + [f"blocks.{L}.hook_resid_post" for L in range(n)]
    acts = capture(model, names, ids_ST)
    with torch.no_grad():
        hidden = model(ids_ST, output_hidden_states=True).hidden_states  # emb, layer 0..n-2 outputs, normed last
    assert len(hidden) == n + 1
    for L in range(n):
        assert acts[f"blocks.{L}.hook_resid_pre"].shape == (2, 9, tiny.D_MODEL)
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_pre"], hidden[L], atol=ATOL, rtol=0)
    for L in range(n - 1):
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_post"], hidden[L + 1], atol=ATOL, rtol=0)
    # The last hidden state has the final norm applied; undo nothing, apply it to ours instead.
    final_norm = model.get_submodule(MANUAL[tiny_family][0])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(acts[f"blocks.{n - 1}.hook_resid_post"]), hidden[n], atol=ATOL, rtol=0)


def test_attn_and_mlp_hooks_match_manual_block(tiny_family, models, ids_ST):
    model = models[tiny_family]
    acts = capture(model, list_hooks(model), ids_ST)
    _, blocks_path, ln_mlp = MANUAL[tiny_family]
    for L in range(tiny.N_LAYERS):
        block = model.get_submodule(f"{blocks_path}.{L}")
        a = {k: acts[f"blocks.{L}.hook_{k}"] for k in HOOK_KINDS}
        assert a["attn_out"].abs().max() > 1e-3  # not a hook that silently captured zeros
        # NeoX (use_parallel_residual) feeds the MLP from resid_pre; sequential blocks from resid_pre + attn_out.
        mlp_source = a["resid_pre"] if tiny_family == "gpt_neox" else a["resid_pre"] + a["attn_out"]
        with torch.no_grad():
            mlp_in = block.get_submodule(ln_mlp)(mlp_source)
            mlp_out = block.mlp(mlp_in)
        torch.testing.assert_close(a["mlp_in"], mlp_in, atol=ATOL, rtol=0)
        torch.testing.assert_close(a["mlp_out"], mlp_out, atol=ATOL, rtol=0)
        # Both layouts: resid_post = resid_pre + attn_out + mlp_out.
        torch.testing.assert_close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"], atol=ATOL, rtol=0)


def test_capture_stops_after_last_needed_hook(tiny_family, models, ids_ST):
    model = models[tiny_family]
    _, blocks_path, _ = MANUAL[tiny_family]
    layer0, layer1, layer2 = (model.get_submodule(f"{blocks_path}.{L}") for L in range(3))
    before = hook_ids(model)
    (c0, h0), (c1, h1), (c2, h2), (c_head, h_head) = map(count_calls, (layer0, layer1, layer2, model.lm_head))
    try:
        capture(model, ["blocks.0.hook_resid_post"], ids_ST)
        assert (len(c0), len(c1), len(c2), len(c_head)) == (1, 0, 0, 0)
        # An input hook stops before its own module runs.
        capture(model, ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"], ids_ST)
        assert (len(c0), len(c1), len(c2), len(c_head)) == (2, 0, 0, 0)
        capture(model, ["blocks.2.hook_mlp_out"], ids_ST)
        assert (len(c0), len(c1), len(c2), len(c_head)) == (3, 1, 0, 0)  # layer 2's forward hook never fired
    finally:
        for h in (h0, h1, h2, h_head):
            h.remove()
    assert hook_ids(model) == before  # capture left no hooks behind although it stopped mid-forward


def test_replacement_changes_logits_and_identity_does_not(tiny_family, models, ids_ST):
    model = models[tiny_family]
    clean = logits(model, ids_ST)
    for name in (
        "blocks.1.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_in",
    ):
        point = resolve_hook(model, name)
        handle = point.register(lambda x: x.clone())
        torch.testing.assert_close(logits(model, ids_ST), clean, atol=0, rtol=0)
        handle.remove()
        handle = point.register(lambda x: None)  # None keeps the original
        torch.testing.assert_close(logits(model, ids_ST), clean, atol=0, rtol=0)
        handle.remove()
        handle = point.register(lambda x: x * 2.0 + 1.0)
        assert (logits(model, ids_ST) - clean).abs().max() > 1e-3, name
        handle.remove()
        torch.testing.assert_close(logits(model, ids_ST), clean, atol=0, rtol=0)  # removable


def test_zero_ablation_at_last_resid_post_gives_constant_logits(models, ids_ST):
    # The final norm maps 0 to 0, so every position must produce exactly lm_head(0) = 0 (no bias).
    model = models["llama"]
    with patched(model, {"blocks.2.hook_resid_post": torch.zeros_like}):
        out = logits(model, ids_ST)
    assert out.abs().max() == 0


def test_patched_removes_hooks_even_on_error(models, ids_ST):
    model = models["gpt2"]
    before = hook_ids(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patched(
            model,
            {"blocks.0.hook_mlp_out": lambda x: x * 0, resolve_hook(model, "blocks.1.hook_resid_pre"): lambda x: None},
        ):
            assert model.transformer.h[0].mlp._forward_hooks and model.transformer.h[1]._forward_pre_hooks
            raise RuntimeError("boom")
    assert hook_ids(model) == before


def test_replacement_with_wrong_shape_names_both_shapes(models, ids_ST):
    model = models["llama"]
    with patched(model, {"blocks.0.hook_mlp_out": lambda x: x[..., :3]}):
        with pytest.raises(HookError, match=r"shape \(2, 9, 3\).*\(2, 9, 64\)"):
            logits(model, ids_ST)


class _Toy(nn.Module):
    """Takes hidden_states positionally or as a keyword; returns a tensor or a tuple."""

    def __init__(self, as_tuple):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, scale=1.0):
        y = hidden_states * scale + 1
        return (y, "extra") if self.as_tuple else y


@pytest.mark.parametrize("as_tuple", [False, True])
def test_hook_point_handles_positional_keyword_and_tuple(as_tuple):
    toy, x = _Toy(as_tuple), torch.ones(1, 2, 3)
    seen = []
    pre = HookPoint("toy_in", toy, "input").register(lambda h: (seen.append(h.sum().item()), h * 10)[1])
    post = HookPoint("toy_out", toy, "output").register(lambda y: -y)
    out_pos, out_kw = toy(x, 2.0), toy(hidden_states=x, scale=2.0)
    pre.remove()
    post.remove()
    for out in (out_pos, out_kw):
        y = out[0] if as_tuple else out
        torch.testing.assert_close(y, torch.full((1, 2, 3), -21.0))  # -(1*10*2 + 1)
        if as_tuple:
            assert out[1] == "extra"
    assert seen == [6.0, 6.0]


def test_unknown_hook_lists_valid_names(models):
    model = models["llama"]
    with pytest.raises(HookError) as err:
        resolve_hook(model, "blocks.1.hook_resid_pots")
    msg = str(err.value)
    assert "Did you mean blocks.1.hook_resid_post" in msg
    for k in HOOK_KINDS:
        assert f"blocks.L.hook_{k}" in msg
    assert "L in 0..2" in msg and "model.layers.2" in msg and "Raw module paths" in msg
    with pytest.raises(HookError, match="layer 7 does not exist, the model has 3 layers"):
        resolve_hook(model, "blocks.7.hook_resid_post")
    with pytest.raises(HookError, match="unknown hook 'blocks.0.hook_z'"):
        resolve_hook(model, "blocks.0.hook_z")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "family,raw,canonical",
    [
        ("llama", "model.layers.1", "blocks.1.hook_resid_post"),
        ("llama", "model.layers.1.mlp.down_proj", "blocks.1.hook_mlp_out"),
        ("gpt2", "transformer.h.1.mlp.dropout", "blocks.1.hook_mlp_out"),
        ("gpt_neox", "gpt_neox.layers.0.attention.dense", "blocks.0.hook_attn_out"),
    ],
)
def test_raw_module_path_equals_canonical_hook(models, ids_ST, family, raw, canonical):
    model = models[family]
    point = resolve_hook(model, raw)
    assert (point.io, point.layer) == ("output", int(raw.split(".")[2]))
    acts = capture(model, [raw, canonical], ids_ST)
    torch.testing.assert_close(acts[raw], acts[canonical], atol=0, rtol=0)


def test_capture_passes_attention_mask(models, ids_ST):
    model = models["llama"]
    mask_ST = torch.ones_like(ids_ST)
    mask_ST[0, :4] = 0  # left padding on row 0
    got = capture(model, ["blocks.1.hook_resid_post"], ids_ST, mask_ST)["blocks.1.hook_resid_post"]
    with torch.no_grad():
        want = model(ids_ST, attention_mask=mask_ST, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    unmasked = capture(model, ["blocks.1.hook_resid_post"], ids_ST)["blocks.1.hook_resid_post"]
    assert (got[0, 4:] - unmasked[0, 4:]).abs().max() > 1e-3  # the mask really reached attention
    torch.testing.assert_close(got[1], unmasked[1], atol=ATOL, rtol=0)


def test_unknown_family_works_with_raw_paths_only(tiny_tokenizer, ids_ST):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    ).eval()
    assert list_hooks(model) == []
    with pytest.raises(HookError, match="model_type 'opt' has no canonical hook layout"):
        resolve_hook(model, "blocks.0.hook_resid_post")
    acts = capture(model, ["model.decoder.layers.0"], ids_ST)
    with torch.no_grad():
        hidden = model(ids_ST, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["model.decoder.layers.0"], hidden[1], atol=ATOL, rtol=0)


def test_hook_that_never_fires_is_reported(models, ids_ST):
    model = models["llama"]
    model.extra = nn.Linear(2, 2)  # registered but never on the forward path
    try:
        with pytest.raises(HookError, match=r"\['extra'\] never fired"):
            capture(model, ["extra"], ids_ST)
    finally:
        del model.extra

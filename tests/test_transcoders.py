"""Transcoders (issue 3): multi-hook activation rows, training, saving, evaluation, interop."""

import itertools
import json

import pytest
import torch

from saeforge.activations import CacheReader, read_manifest, write_cache
from saeforge.activations.stream import ActivationStream, hook_columns
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.models import load_model, resolve_hook
from saeforge.models.hooks import capture

HOOK_IN, HOOK_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"
ACT = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=8, shard_rows=300)


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)


def batches(stream, n):
    return list(itertools.islice(iter(stream), n))


# ---- multi-hook rows -----------------------------------------------------------------------
def test_two_hook_stream_columns_equal_single_hook_streams(lm, corpus):
    p_in, p_out = resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)
    both = ActivationStream(lm, [p_in, p_out], corpus, ACT, seed=3)
    assert both.columns == {HOOK_IN: slice(0, 64), HOOK_OUT: slice(64, 128)} == hook_columns(lm, [p_in, p_out])
    assert both.d_in == 128
    rows = batches(both, 12)  # more than one chunk: 8 windows x 31 rows < 12 x 64
    assert both.state_dict()["chunk"] >= 2
    for point, cols in ((p_in, slice(0, 64)), (p_out, slice(64, 128))):
        alone = ActivationStream(lm, point, corpus, ACT, seed=3)
        assert alone.d_in == 64 and alone.columns == {point.name: slice(0, 64)}
        for a, b in zip(batches(alone, 12), rows, strict=True):
            assert torch.equal(a, b[:, cols])  # same LM pass values, same shuffle


def test_one_hook_in_a_list_is_the_single_hook_stream(lm, corpus):
    p = resolve_hook(lm, HOOK_OUT)
    a, b = ActivationStream(lm, p, corpus, ACT, seed=1), ActivationStream(lm, [p], corpus, ACT, seed=1)
    for x, y in zip(batches(a, 5), batches(b, 5), strict=True):
        assert torch.equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                          for k in sa)


def test_two_hook_stream_resumes_where_it_stopped(lm, corpus):
    points = [resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)]
    whole = batches(ActivationStream(lm, points, corpus, ACT, seed=0), 10)
    first = ActivationStream(lm, points, corpus, ACT, seed=0)
    batches(first, 6)
    state = first.state_dict()
    again = ActivationStream(lm, points, corpus, ACT, seed=0)
    again.load_state_dict(state)
    for a, b in zip(batches(again, 4), whole[6:], strict=True):
        assert torch.equal(a, b)


def test_two_hook_cache_round_trip(tmp_path, lm, corpus):
    p_in, p_out = resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)
    m = write_cache(lm, [p_in, p_out], corpus, ACT, tmp_path / "two", n_tokens=600, progress=False)
    assert (m["hooks"], m["widths"], m["d_in"]) == ([HOOK_IN, HOOK_OUT], [64, 64], 128) and "hook" not in m
    reader = CacheReader(tmp_path / "two", batch_size=64)
    assert reader.columns == {HOOK_IN: slice(0, 64), HOOK_OUT: slice(64, 128)} and reader.d_in == 128
    shard = reader.load_shard(0)
    direct = capture(lm, [p_in, p_out], shard["windows"].long())
    w, pos = shard["window"] - shard["window"].min(), shard["position"].long()
    assert torch.equal(shard["acts"][:, :64], direct[HOOK_IN][w, pos])
    assert torch.equal(shard["acts"][:, 64:], direct[HOOK_OUT][w, pos])
    # the single-hook cache of the output hook holds exactly the output columns
    single = write_cache(lm, p_out, corpus, ACT, tmp_path / "one", n_tokens=600, progress=False)
    assert (single["hook"], single["hooks"], single["widths"]) == (HOOK_OUT, [HOOK_OUT], [64])
    one = CacheReader(tmp_path / "one", batch_size=64)
    for a, b in zip(batches(one, 8), batches(reader, 8), strict=True):
        assert torch.equal(a, b[:, 64:])


def test_cache_without_hooks_field_reads_and_resumes_as_single_hook(tmp_path, lm, corpus):
    p = resolve_hook(lm, HOOK_OUT)
    write_cache(lm, p, corpus, ACT, tmp_path, n_tokens=300, progress=False)
    m = read_manifest(tmp_path)
    old = {k: v for k, v in m.items() if k not in ("hooks", "widths")}  # as saeforge wrote it before "hooks"
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    reader = CacheReader(tmp_path, batch_size=64)
    assert reader.hooks == [HOOK_OUT] and reader.columns == {HOOK_OUT: slice(0, 64)}
    more = write_cache(lm, p, corpus, ACT, tmp_path, n_tokens=600, progress=False)  # resumes, not "different"
    assert more["n_rows"] >= 600 and more["shards"][: len(m["shards"])] == m["shards"]


# ---- the SAE side: shapes, hand-computed forward, loss against the target, folding ------------
def make(arch, d_in=3, d_out=2, d_sae=4, skip=False, **kw):
    from saeforge.saes.registry import config_class, sae_class

    cfg = config_class(arch)(d_in=d_in, d_out=d_out, d_sae=d_sae, skip=skip, apply_b_dec_to_input=False, **kw)
    return sae_class(arch)(cfg)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_transcoder_shapes_follow_saelens_layout(arch):
    kw = {"k": 2} if arch == "topk" else {}
    sae = make(arch, d_in=5, d_out=3, d_sae=7, skip=True, **kw)
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert shapes["W_enc"] == (5, 7) and shapes["W_dec"] == (7, 3) and shapes["b_dec"] == (3,)
    assert shapes["W_skip"] == (3, 5) and not sae.W_skip.any()  # zero-initialised
    assert (sae.d_in, sae.d_out, sae.d_sae, sae.is_transcoder) == (5, 3, 7, True)
    assert sae(torch.randn(4, 5)).shape == (4, 3)


def test_skip_transcoder_forward_by_hand():
    sae = make("relu", d_in=3, d_out=2, d_sae=2, skip=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
        sae.W_skip.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # pre = [1 + 3, 2 - 3 - 1] = [4, -2] -> f = [4, 0]; W_dec^T f = [8, 0]; + b_dec = [8.5, -0.5];
    # W_skip x = [1, 6] -> y_hat = [9.5, 5.5]   (b_dec is NOT subtracted from x: it lives in y's space)
    assert torch.equal(sae.encode(x), torch.tensor([[4.0, 0.0]]))
    assert torch.equal(sae(x), torch.tensor([[9.5, 5.5]]))


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_transcoder_loss_is_against_the_output_columns(arch):
    from saeforge.saes.base import LossContext

    kw = {"k": 2} if arch == "topk" else {}
    sae = make(arch, d_in=5, d_out=3, d_sae=8, skip=True, **kw)
    with torch.no_grad():
        sae.W_skip.normal_()
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    out = sae.training_loss(torch.cat([x, y], dim=1), LossContext())
    torch.testing.assert_close(out.x_hat_BD, sae(x))
    torch.testing.assert_close(out.parts["mse"], (y - sae(x)).pow(2).sum(1).mean())
    out.loss.backward()
    assert sae.W_skip.grad is not None and sae.W_skip.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[input \| output\] of width 5 \+ 3"):
        sae.training_loss(x, LossContext())


@pytest.mark.parametrize("arch", ["gated", "batchtopk", "matryoshka"])
def test_unsupported_architectures_say_which_can_transcode(arch):
    from saeforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"cannot be a transcoder.*\['jumprelu', 'relu', 'topk'\]"):
        make(arch, d_sae=64)


def test_transcoder_config_refuses_b_dec_on_input_and_tying():
    from saeforge.config import ConfigError
    from saeforge.saes.registry import config_class

    with pytest.raises(ConfigError, match="b_dec lives in the output space"):
        config_class("relu")(d_in=3, d_out=2)
    with pytest.raises(ConfigError, match="cannot be W_dec"):
        config_class("relu")(d_in=3, d_out=2, apply_b_dec_to_input=False, tied=True)
    with pytest.raises(ConfigError, match="skip=True needs a transcoder"):
        make("relu", d_out=0, skip=True)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_fold_with_separate_input_and_output_scales_is_exact(arch):
    kw = {"k": 3} if arch == "topk" else {}
    sae = make(arch, d_in=6, d_out=4, d_sae=10, skip=True, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if arch == "jumprelu":
            sae.threshold.uniform_(0.1, 0.5)
    import copy

    folded, c_in, c_out = copy.deepcopy(sae), 3.0, 0.25
    folded.fold_input_scale(c_in, c_out)
    x = torch.randn(32, 6, dtype=torch.float32)
    torch.testing.assert_close(folded.encode(x), sae.encode(c_in * x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), sae(c_in * x) / c_out, rtol=1e-5, atol=1e-5)

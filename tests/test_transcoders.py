"""Transcoders (issue 3): multi-hook activation rows, training, saving, evaluation, interop."""

import itertools
import json

import pytest
import torch

from saeforge.activations import CacheReader, read_manifest, write_cache
from saeforge.activations.stream import ActivationStream, hook_columns, train_windows
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.models import load_model, resolve_hook
from saeforge.models.hooks import capture

HOOK_IN, HOOK_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"
ACT = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=8, shard_rows=300)


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
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa
    )


def test_buffer_mb_caps_the_windows_mixed_at_once_by_the_width_of_every_hook(lm, corpus):
    """A row of two d=64 float32 hooks is 512 bytes, a 32-token window 16 KiB: 1 MB holds 64 windows, so
    asking to mix 256 gives exactly the stream that mixes 64 (same chunks, same shuffles)."""
    from dataclasses import replace

    points = [resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)]
    capped = ActivationStream(lm, points, corpus, replace(ACT, shuffle_sequences=256, buffer_mb=1), seed=2)
    assert capped.chunk_sequences == 2**20 // (32 * 128 * 4) == 64
    plain = ActivationStream(lm, points, corpus, replace(ACT, shuffle_sequences=64), seed=2)
    assert plain.chunk_sequences == 64
    uncapped = ActivationStream(lm, points, corpus, replace(ACT, shuffle_sequences=256), seed=2)
    assert uncapped.chunk_sequences == 256
    got, want = batches(capped, 40), batches(plain, 40)
    assert capped.state_dict()["chunk"] == 1  # into the second chunk: 40 x 64 rows > 64 windows x 31 kept rows
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(batches(uncapped, 1)[0], want[0])


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


# ---- trainer: one scale per side, folded exactly on export; resume -------------------------------
def transcoder_rows(n_chunks=30, rows=256, seed=0):
    """[x | y] rows with y = A x + b (+ a little noise) and very different norms on each side."""
    from saeforge.activations.batcher import ShuffledBatcher

    g = torch.Generator().manual_seed(seed)
    A, b = torch.randn(6, 10, generator=g), torch.randn(6, generator=g)
    chunks = []
    for _ in range(n_chunks):
        x = torch.randn(rows, 10, generator=g) * 50.0
        y = (x @ A.T + b + 0.1 * torch.randn(rows, 6, generator=g)) * 1e-3
        chunks.append(torch.cat([x, y], dim=1))
    return ShuffledBatcher(lambda i: chunks[i] if i < len(chunks) else None, batch_size=128, seed=seed)


def small_trainer(run_dir=None, **kw):
    from saeforge.config import TrainConfig
    from saeforge.training.trainer import Trainer

    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    sae = make("relu", d_in=10, d_out=6, d_sae=32, skip=True, l1_coefficient=0.1)
    sae.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        total_tokens=128 * 40, lr=1e-2, lr_warmup_steps=2, checkpoint_every_steps=7, log_every_steps=5, **kw
    )
    return Trainer(sae, cfg, batch_size=128, run_dir=run_dir, progress=False)


def test_trainer_scales_each_side_and_export_folds_both_exactly(tmp_path):
    from saeforge.saes.formats import load_sae, save_sae

    tr = small_trainer(tmp_path)
    tr.fit(transcoder_rows())
    head = torch.cat(batches(transcoder_rows(), tr.cfg.norm_estimate_batches))
    x, y = head[:, :10].double(), head[:, 10:].double()
    assert (tr.scale * x).norm(dim=1).mean() == pytest.approx(10**0.5, rel=1e-6)  # E||c x|| = sqrt(d_in)
    assert (tr.scale_out * y).norm(dim=1).mean() == pytest.approx(6**0.5, rel=1e-6)  # E||c_out y|| = sqrt(d_out)
    assert tr.scale_out / tr.scale > 100  # the sides really needed their own scales
    rec = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["explained_variance"] > 0.9  # logged against the output columns: y is nearly linear in x

    raw = tr.export_sae()
    x_raw = torch.randn(64, 10) * 50.0
    torch.testing.assert_close(raw(x_raw), tr.sae(x_raw * tr.scale) / tr.scale_out, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(raw.encode(x_raw), tr.sae.encode(x_raw * tr.scale), rtol=1e-4, atol=1e-5)
    back = load_sae(save_sae(raw, tmp_path / "sae", {"hook_name": "a", "hook_name_out": "b"}))
    assert torch.equal(back(x_raw), raw(x_raw))


@pytest.mark.slow
def test_transcoder_training_resumes_to_the_uninterrupted_result(tmp_path):
    whole = small_trainer(tmp_path / "whole")
    whole.fit(transcoder_rows())
    cut = small_trainer(tmp_path / "cut")
    src = transcoder_rows()
    batches_ = cut._batches(src)
    for x, pos in cut.prepare(batches_) + list(itertools.islice(batches_, 10)):
        cut.train_step(x, pos)  # 14 steps: the checkpoint at 14 holds both scales
    again = small_trainer(tmp_path / "cut")
    src2 = transcoder_rows()
    assert again.resume(src2) and again.step == 14 and (again.scale, again.scale_out) == (cut.scale, cut.scale_out)
    again.fit(src2)
    for k, v in whole.sae.state_dict().items():
        torch.testing.assert_close(again.sae.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ---- evaluation: two-hook splice ---------------------------------------------------------------


def eval_cfg(tokens=1024, ce_tokens=512):
    from saeforge.config import EvalConfig

    return EvalConfig(tokens=tokens, ce_tokens=ce_tokens, batch_size=8)


def identity_transcoder(d=64):
    """relu(x) - relu(-x) = x exactly: W_enc = [I, -I], W_dec = [I; -I], biases 0."""
    sae = make("relu", d_in=d, d_out=d, d_sae=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_transcoder_between_two_names_of_one_tensor_scores_one(lm, corpus):
    from saeforge.evals.report import evaluate

    # resid_post of layer 0 IS resid_pre of layer 1: a transcoder that copies its input loses nothing
    m = evaluate(
        lm,
        "blocks.0.hook_resid_post",
        identity_transcoder(),
        corpus,
        eval_cfg(),
        progress=False,
        hook_out="blocks.1.hook_resid_pre",
    )
    assert (m["hook"], m["hook_out"]) == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9) and m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-9) and m["kl_sae"] == pytest.approx(0.0, abs=1e-9)
    # the baseline really moved (a random tiny LM is worse than uniform, so zeros may even help it)
    assert abs(m["ce_zero"] - m["ce_clean"]) > 1e-3 and m["kl_zero"] > 1e-3
    assert m["ce_score"] == pytest.approx(1.0, abs=1e-6) and m["kl_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_score_mean"] == pytest.approx(1.0, abs=1e-6)


def test_splice_replaces_the_output_hook_with_the_prediction_from_the_input_hook(lm, corpus):
    """Hand-checked: W_dec = 0, so mlp_out becomes W_skip x_in + b_dec; resid_post moves by exactly that change."""
    from saeforge.data import excluded_mask
    from saeforge.evals.splice import recording, replaced, transcoder_replacement

    sae = make("relu", d_in=64, d_out=64, d_sae=8, skip=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_skip.copy_(torch.randn(64, 64, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(64, generator=g))
    tokens = torch.stack(list(itertools.islice(train_windows(lm.tokenizer, corpus), 2)))
    excluded = excluded_mask(tokens, lm.tokenizer, corpus)
    p_in, p_out, p_post = (resolve_hook(lm, n) for n in (HOOK_IN, HOOK_OUT, "blocks.0.hook_resid_post"))
    clean = capture(lm, [p_in, p_out, p_post], tokens)
    box: dict = {}
    with recording(p_in, box), replaced(p_out, transcoder_replacement(sae, box, HOOK_IN, HOOK_OUT), excluded):
        post = capture(lm, [p_post], tokens)[p_post.name]
    want_mlp = clean[HOOK_IN] @ sae.W_skip.detach().T + sae.b_dec.detach()
    want_mlp = torch.where(excluded[..., None], clean[HOOK_OUT], want_mlp)  # excluded positions stay clean
    torch.testing.assert_close(
        post - clean["blocks.0.hook_resid_post"], want_mlp - clean[HOOK_OUT], rtol=1e-5, atol=1e-5
    )
    assert not excluded.all() and excluded[:, 0].all()


def test_splice_refuses_an_output_hook_that_comes_first(lm, corpus):
    from saeforge.evals.report import evaluate

    with pytest.raises(ValueError, match="fired before the input hook.*must come first"):
        evaluate(
            lm,
            "blocks.1.hook_resid_pre",
            identity_transcoder(),
            corpus,
            eval_cfg(),
            progress=False,
            hook_out="blocks.0.hook_resid_post",
        )


# ---- SAELens format ----------------------------------------------------------------------------
def randomised(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.1, 0.5)
    return sae


@pytest.mark.parametrize(
    "arch,skip,saelens_name",
    [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", False, "jumprelu_transcoder"),
        ("jumprelu", True, "jumprelu_skip_transcoder"),
        ("topk", True, "topk_skip_transcoder"),
    ],
)
def test_saelens_transcoder_layout_round_trips(tmp_path, arch, skip, saelens_name):
    from safetensors.torch import load_file

    from saeforge.saes.formats import load_sae, read_cfg, save_sae

    kw = {"k": 3} if arch == "topk" else {}
    sae = randomised(make(arch, d_in=5, d_out=3, d_sae=7, skip=skip, **kw))
    save_sae(sae, tmp_path, {"hook_name": HOOK_IN, "hook_name_out": HOOK_OUT})
    cfg = read_cfg(tmp_path)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (saelens_name, 5, 3, 7)
    assert cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["hook_name_out"] == HOOK_OUT
    shapes = {k: list(v.shape) for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items()}
    assert shapes["W_enc"] == [5, 7] and shapes["W_dec"] == [7, 3] and shapes["b_dec"] == [3]
    assert ("W_skip" in shapes) == skip and shapes.get("W_skip", [3, 5]) == [3, 5]  # SAELens: [d_out, d_in]
    back = load_sae(tmp_path)
    x = torch.randn(9, 5)
    assert type(back) is type(sae) and back.is_transcoder and back.cfg.skip == skip
    assert torch.equal(back(x), sae(x)) and torch.equal(back.encode(x), sae.encode(x))


@pytest.mark.parametrize(
    "saelens_name,skip",
    [
        ("transcoder", False),
        ("skip_transcoder", True),
        ("jumprelu_transcoder", False),
        ("jumprelu_skip_transcoder", True),
    ],
)
def test_reads_a_transcoder_folder_as_saelens_writes_it(tmp_path, saelens_name, skip):
    """cfg.json of SAELens v6's (Skip/JumpReLU)Transcoder: no saeforge keys, skip implied by the name."""
    from safetensors.torch import save_file

    from saeforge.saes.interop import load_foreign

    g = torch.Generator().manual_seed(1)
    t = {
        "W_enc": torch.randn(5, 7, generator=g),
        "b_enc": torch.randn(7, generator=g),
        "W_dec": torch.randn(7, 3, generator=g),
        "b_dec": torch.randn(3, generator=g),
    }
    if skip:
        t["W_skip"] = torch.randn(3, 5, generator=g)
    if saelens_name.startswith("jumprelu"):
        t["threshold"] = torch.rand(7, generator=g)
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "architecture": saelens_name,
        "d_in": 5,
        "d_sae": 7,
        "d_out": 3,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": "m", "hook_name": HOOK_IN, "hook_name_out": HOOK_OUT, "sae_lens_version": "6.54.12"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_foreign(tmp_path)
    x = torch.randn(11, 5)
    pre = x @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"]) if "threshold" in t else torch.relu(pre)
    want = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)  # SAELens's forward, written out
    assert sae.cfg.skip == skip
    torch.testing.assert_close(sae(x), want)


def test_transcoder_file_read_as_a_plain_sae_is_refused_clearly(tmp_path, lm, corpus):
    from saeforge.evals.report import evaluate
    from saeforge.saes.formats import load_sae, save_sae

    tc = randomised(make("relu", d_in=64, d_out=128, d_sae=16))
    save_sae(tc, tmp_path / "tc", {"hook_name": HOOK_IN, "hook_name_out": "model.layers.0.mlp.up_proj"})
    # without its output hook, evaluation says what the file is and what to pass
    with pytest.raises(ValueError, match=r"transcoder \(d_in=64 at 'blocks.0.hook_mlp_in' -> d_out=128\).*hook_out"):
        evaluate(lm, HOOK_IN, load_sae(tmp_path / "tc"), corpus, eval_cfg(), progress=False)
    # an output hook of the wrong width: both widths named
    with pytest.raises(ValueError, match="d_out=128.*gives width 64"):
        evaluate(lm, HOOK_IN, load_sae(tmp_path / "tc"), corpus, eval_cfg(), progress=False, hook_out=HOOK_OUT)
    # a plain SAE given an output hook
    from saeforge.saes.registry import config_class, sae_class

    plain = sae_class("relu")(config_class("relu")(d_in=64, d_sae=16))
    with pytest.raises(ValueError, match="reconstructs its own input.*drop --model.hook_out"):
        evaluate(lm, HOOK_IN, plain, corpus, eval_cfg(), progress=False, hook_out=HOOK_OUT)
    # the same weights under a cfg.json that lost d_out: W_dec's shape does not fit a plain SAE
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    cfg.pop("d_out")
    cfg["metadata"]["saeforge_architecture"], cfg["architecture"] = "relu", "standard"
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_dec has shape \[16, 128\].*implies \[16, 64\].*d_out.*missing"):
        load_sae(tmp_path / "tc")


# ---- real training on tiny LMs -------------------------------------------------------------------
def run_cfg(model_dir, corpus_dir, out, name, arch, tokens, skip=False, hook_in=HOOK_IN, hook_out=HOOK_OUT, **sae):
    from saeforge.training.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": {
                "name": str(model_dir),
                "hook": hook_in,
                "hook_out": hook_out,
                "dtype": "float32",
                "device": "cpu",
            },
            "data": {"corpus": str(corpus_dir), "context_size": 64, "holdout_fraction": 0.2},
            "activations": {"batch_size": 256, "shuffle_sequences": 64},
            "sae": {"architecture": arch, "d_sae": 256, "skip": skip, **({"k": 8} if arch == "topk" else {}), **sae},
            "train": {"total_tokens": tokens, "lr": 4e-3, "out_dir": str(out), "run_name": name},
            "eval": {"tokens": 4096, "ce_tokens": 2048},
        }
    )


@pytest.fixture(scope="module")
def zero_predictor_metrics(lm, tiny_model_dirs, text_corpus):
    """What predicting 0 at blocks.0.hook_mlp_out scores on the same held-out text (EV < 0 by definition)."""
    from saeforge.evals.report import evaluate

    cfg = run_cfg(tiny_model_dirs["llama"], text_corpus, "unused", "z", "relu", 1)
    zero = make("relu", d_in=64, d_out=64, d_sae=8)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    return evaluate(lm, HOOK_IN, zero, cfg.data, cfg.eval, progress=False, hook_out=HOOK_OUT)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
@pytest.mark.slow
def test_transcoder_learns_the_mlp_of_a_tiny_llama(
    tmp_path, lm, tiny_model_dirs, text_corpus, arch, zero_predictor_metrics
):
    from saeforge.saes.formats import load_sae, read_cfg
    from saeforge.training.run import train

    cfg = run_cfg(tiny_model_dirs["llama"], text_corpus, tmp_path, arch, arch, 24_000)
    result = train(cfg, progress=False, lm=lm)
    m, zero = result.metrics, zero_predictor_metrics
    assert m["hook_out"] == HOOK_OUT and m["n_tokens"] == zero["n_tokens"] > 3000
    assert m["explained_variance"] > 0.3 and zero["explained_variance"] < 0  # seeded: 0.61 / 0.45 / 0.73 measured
    assert m["mse"] < 0.6 * zero["mse"] and m["kl_score"] > 0.3
    cfg_json = read_cfg(result.sae_dir)
    assert cfg_json["metadata"]["hook_name_out"] == HOOK_OUT and cfg_json["d_out"] == 64
    assert cfg_json["metadata"]["saeforge_output_scale_folded"] > 0
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["model"]["hook_out"] == HOOK_OUT and saved["sae"]["apply_b_dec_to_input"] is False
    # the saved folder is the evaluated transcoder: scored again from disk, the same numbers
    from saeforge.evals.report import evaluate

    again = evaluate(lm, HOOK_IN, load_sae(result.sae_dir), cfg.data, cfg.eval, progress=False, hook_out=HOOK_OUT)
    assert again["explained_variance"] == pytest.approx(m["explained_variance"], rel=1e-9)


@pytest.mark.slow
def test_skip_transcoder_beats_plain_where_the_mlp_is_near_linear(tmp_path, tiny_model_dirs, text_corpus):
    """The tiny GPT-2's MLP (small weights, GELU near 0) is mostly linear: W_skip takes that part for free."""
    from saeforge.training.run import train

    gpt2 = load_model(str(tiny_model_dirs["gpt2"]), dtype="float32", device="cpu")
    ev = {}
    for skip in (False, True):
        cfg = run_cfg(tiny_model_dirs["gpt2"], text_corpus, tmp_path, f"skip{skip}", "relu", 20_000, skip=skip)
        ev[skip] = train(cfg, progress=False, lm=gpt2).metrics
    assert (
        ev[True]["explained_variance"] > 0.8 and ev[True]["explained_variance"] > ev[False]["explained_variance"] + 0.2
    )
    assert ev[True]["l0"] < ev[False]["l0"]  # the latents no longer carry the linear part
    assert ev[True]["kl_score"] > ev[False]["kl_score"]


def test_transcoder_config_errors_before_any_model_loads():
    from saeforge.config import ConfigError
    from saeforge.training.config import RunConfig

    def cfg(model=None, sae=None, train=None):
        return RunConfig.from_dict(
            {"model": {"hook": HOOK_IN, "hook_out": HOOK_OUT, **(model or {})}, "sae": sae or {}, "train": train or {}}
        )

    assert cfg().sae.apply_b_dec_to_input is False and cfg().model.hook_names() == [HOOK_IN, HOOK_OUT]
    with pytest.raises(ConfigError, match="is model.hook itself"):
        cfg(model={"hook_out": HOOK_IN})
    with pytest.raises(ConfigError, match=r"cannot be a transcoder.*\['jumprelu', 'relu', 'topk'\]"):
        cfg(sae={"architecture": "gated"})
    with pytest.raises(ConfigError, match="not implemented for transcoders"):
        cfg(sae={"architecture": "relu"}, train={"dead_latents": "ghost"})
    with pytest.raises(ConfigError, match="set model.hook_out"):
        RunConfig.from_dict({"sae": {"skip": True}})


@pytest.mark.slow
def test_cli_caches_trains_and_evaluates_a_transcoder(tiny_model_dirs, text_corpus, tmp_path):
    import subprocess
    import sys

    def saeforge(*args):
        proc = subprocess.run([sys.executable, "-m", "saeforge.cli", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    common = [
        "--model",
        tiny_model_dirs["llama"],
        "--hook",
        HOOK_IN,
        "--model.hook_out",
        HOOK_OUT,
        "--corpus",
        text_corpus,
        "--data.context_size",
        64,
        "--data.holdout_fraction",
        0.2,
        "--quiet",
    ]
    out = saeforge("cache", "--out", tmp_path / "cache", "--tokens", 6000, *common)
    assert f"{HOOK_IN} + {HOOK_OUT}" in out
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (m["hooks"], m["widths"], m["d_in"]) == ([HOOK_IN, HOOK_OUT], [64, 64], 128)
    out = saeforge(
        "train",
        *common,
        "--activations.cache",
        tmp_path / "cache",
        "--tokens",
        12_000,
        "--activations.batch_size",
        256,
        "--sae.d_sae",
        256,
        "--sae.k",
        8,
        "--sae.skip",
        "true",
        "--train.lr",
        4e-3,
        "--train.out_dir",
        tmp_path,
        "--name",
        "tc",
        "--eval.tokens",
        2048,
        "--eval.ce_tokens",
        1024,
    )
    assert "output hook (transcoder)" in out and "CE score" in out
    ev = json.loads((tmp_path / "tc" / "sae" / "eval.json").read_text())
    assert ev["hook_out"] == HOOK_OUT and ev["explained_variance"] > 0.2 and ev["l0"] == pytest.approx(8.0)
    # `saeforge eval` finds the output hook in the saved config and scores the same tokens alike
    saeforge("eval", tmp_path / "tc" / "sae", "--eval.tokens", 2048, "--eval.ce_tokens", 1024, "--quiet")
    ev2 = json.loads((tmp_path / "tc" / "sae" / "eval.json").read_text())
    assert ev2["explained_variance"] == pytest.approx(ev["explained_variance"], rel=1e-6)
    assert ev2["kl_score"] == pytest.approx(ev["kl_score"], rel=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_reads_a_sparsify_transcoder(tmp_path, skip):
    """sparsify's layout (encoder.weight [F, D], W_dec [F, D], b_dec, W_skip [D, D]); transcode: b_dec not subtracted."""
    from safetensors.torch import save_file

    from saeforge.saes.interop import load_foreign

    g = torch.Generator().manual_seed(2)
    t = {
        "encoder.weight": torch.randn(12, 6, generator=g),
        "encoder.bias": torch.randn(12, generator=g),
        "W_dec": torch.randn(12, 6, generator=g),
        "b_dec": torch.randn(6, generator=g),
    }
    if skip:
        t["W_skip"] = torch.randn(6, 6, generator=g)
    save_file(t, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {"activation": "topk", "k": 3, "num_latents": 12, "d_in": 6, "transcode": True, "skip_connection": skip}
        )
    )
    sae = load_foreign(tmp_path)
    x = torch.randn(10, 6)
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify: ReLU, then top-k, of x itself
    vals, idx = pre.topk(3, dim=-1)
    want = torch.zeros(10, 12).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
    assert sae.is_transcoder and sae.cfg.skip == skip and not sae.cfg.apply_b_dec_to_input
    torch.testing.assert_close(sae(x), want)


def test_analysis_tools_refuse_a_transcoder_folder(tmp_path):
    from saeforge.analysis.common import load_for_analysis
    from saeforge.saes.formats import save_sae

    save_sae(
        make("relu", d_in=4, d_out=3, d_sae=5),
        tmp_path,
        {"model_name": "m", "hook_name": HOOK_IN, "hook_name_out": HOOK_OUT},
    )
    with pytest.raises(ValueError, match=r"is a transcoder \(blocks.0.hook_mlp_in -> blocks.0.hook_mlp_out\)"):
        load_for_analysis(tmp_path)


def test_training_refuses_an_output_hook_that_runs_first(lm, tiny_model_dirs, text_corpus, tmp_path):
    from saeforge.config import ConfigError
    from saeforge.training.run import forward_order, hook_points

    points = [resolve_hook(lm, n) for n in (HOOK_OUT, "blocks.1.hook_resid_pre", HOOK_IN)]
    assert forward_order(lm, points) == [HOOK_IN, HOOK_OUT, "blocks.1.hook_resid_pre"]
    cfg = run_cfg(
        tiny_model_dirs["llama"],
        text_corpus,
        tmp_path,
        "r",
        "topk",
        1000,
        hook_in="blocks.1.hook_resid_pre",
        hook_out="blocks.0.hook_resid_post",
    )
    with pytest.raises(ConfigError, match="runs before model.hook.*swap them"):
        hook_points(cfg, lm)
    assert [
        p.name for p in hook_points(run_cfg(tiny_model_dirs["llama"], text_corpus, tmp_path, "r", "topk", 1000), lm)
    ] == [HOOK_IN, HOOK_OUT]

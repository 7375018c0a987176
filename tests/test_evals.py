"""saeforge.evals: metrics against direct float64 computations, spliced CE/KL against HF's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.evals.metrics import ReconstructionStats

# ---------------------------------------------------------------- reconstruction metrics


def _random_batch(n: int = 300, d: int = 16, f: int = 40, offset: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    pre = torch.randn(n, f, generator=g, dtype=torch.float64)
    f_BF = torch.relu(pre - 1.0)  # ~16% firing per latent
    return x, x_hat, f_BF


def _feed(stats: ReconstructionStats, x, x_hat, f_BF, splits=(0, 7, 100, 101, 250)):
    bounds = list(splits) + [x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        stats.update(x[a:b], x_hat[a:b], f_BF[a:b])


def test_stats_match_direct_float64():
    x, x_hat, f_BF = _random_batch()
    stats = ReconstructionStats(16, 40)
    _feed(stats, x, x_hat, f_BF)
    r = stats.result()

    err_N = (x - x_hat).pow(2).sum(1)
    total_var = (x.pow(2).sum(1).mean() - x.mean(0).pow(2).sum()).item()
    assert r["n_tokens"] == 300
    assert r["l0"] == pytest.approx((f_BF != 0).sum(1).double().mean().item(), abs=1e-12)
    assert r["mse"] == pytest.approx(err_N.mean().item(), rel=1e-12)
    assert r["mse_per_element"] == pytest.approx(err_N.mean().item() / 16, rel=1e-12)
    assert r["explained_variance"] == pytest.approx(1 - err_N.mean().item() / total_var, abs=1e-12)
    assert r["shrinkage_gamma"] == pytest.approx((x_hat.pow(2).sum() / (x_hat * x).sum()).item(), rel=1e-12)
    torch.testing.assert_close(r["feature_freq"], (f_BF != 0).double().mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(r["mean_x"], x.mean(0), rtol=0, atol=1e-12)
    assert sum(r["log10_freq_hist_counts"]) == 40


def test_explained_variance_is_centred():
    """A constant offset added to x and x_hat leaves EV unchanged: the mean is not 'variance'."""
    x, x_hat, f_BF = _random_batch()
    plain, shifted = ReconstructionStats(16, 40), ReconstructionStats(16, 40)
    _feed(plain, x, x_hat, f_BF)
    _feed(shifted, x + 1e4, x_hat + 1e4, f_BF)
    ev = plain.result()["explained_variance"]
    assert 0.5 < ev < 0.999  # the noise is real but small compared with x's spread
    assert shifted.result()["explained_variance"] == pytest.approx(ev, abs=1e-9)
    # An uncentred formula (1 - mse / E||x||^2) would give nearly 1 with the offset: make sure we don't.
    assert shifted.result()["explained_variance"] < 0.999


def test_perfect_and_mean_reconstruction():
    x, _, f_BF = _random_batch()
    perfect = ReconstructionStats(16, 40)
    perfect.update(x, x.clone(), f_BF)
    assert perfect.result()["explained_variance"] == 1.0
    # Predicting the dataset mean explains exactly nothing.
    mean_only = ReconstructionStats(16, 40)
    _feed(mean_only, x, x.mean(0).expand_as(x), f_BF)
    assert mean_only.result()["explained_variance"] == pytest.approx(0.0, abs=1e-12)


def test_dead_and_dense_hand_checked():
    # 200 tokens, 5 latents: fires on 0, 1, 2 (=1%), 20 (=10%), 21 (>10%) tokens.
    n, counts = 200, [0, 1, 2, 20, 21]
    f_BF = torch.zeros(n, 5)
    for j, c in enumerate(counts):
        f_BF[:c, j] = 0.5 + j
    x = torch.randn(n, 3)
    stats = ReconstructionStats(3, 5, dense_threshold=0.1)
    _feed(stats, x, x, f_BF, splits=(0, 1, 19, 150))
    r = stats.result()
    assert r["dead_count"] == 1 and r["dead_fraction"] == pytest.approx(0.2)
    assert r["dense_fraction"] == pytest.approx(0.2)  # only 21/200 > 10%; exactly 10% is not dense
    assert r["dense_fraction_1pct"] == pytest.approx(0.4)  # 20 and 21; 2/200 = 1% is not > 1%
    assert r["l0"] == pytest.approx(sum(counts) / n)
    assert r["feature_freq"].tolist() == [c / n for c in counts]
    # Histogram: the dead latent sits in the lowest bin, 21/200 in [-1, -0.5).
    hist = r["log10_freq_hist_counts"]
    assert hist[0] == 1 and hist[-2] == 2 and sum(hist) == 5


def test_stats_memory_is_bounded_and_errors_are_clear():
    stats = ReconstructionStats(8, 12)
    state_before = {k: (v.shape if torch.is_tensor(v) else None) for k, v in vars(stats).items()}
    for seed in range(5):
        x, x_hat, f_BF = _random_batch(n=50, d=8, f=12, seed=seed)
        stats.update(x.float(), x_hat.float(), f_BF.float())
    assert {k: (v.shape if torch.is_tensor(v) else None) for k, v in vars(stats).items()} == state_before
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        stats.update(torch.zeros(4, 9), torch.zeros(4, 9), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionStats(8, 12).result()
    assert math.isnan(_constant_ev())


def _constant_ev() -> float:
    stats = ReconstructionStats(2, 3)
    stats.update(torch.ones(4, 2), torch.ones(4, 2), torch.ones(4, 3))
    return stats.result()["explained_variance"]


# ---------------------------------------------------------------- spliced CE / KL

import tiny  # noqa: E402  (conftest puts tests/ on sys.path)

from saeforge.evals import splice  # noqa: E402
from saeforge.models import hooks  # noqa: E402

VOCAB = 97
SPLICE_FAMILIES = ("llama", "gpt2", "gpt_neox")


class IdentitySAE(torch.nn.Module):
    """decode(encode(x)) == x bit for bit."""

    def encode(self, x_BD):
        return x_BD

    def decode(self, f_BF):
        return f_BF


class ZeroSAE(IdentitySAE):
    def decode(self, f_BF):
        return torch.zeros_like(f_BF)


class LinearSAE(torch.nn.Module):
    """A real (bad) SAE with float32 parameters: ReLU encoder, linear decoder."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)

    def encode(self, x_BD):
        return torch.relu(x_BD @ self.W_enc)

    def decode(self, f_BF):
        return f_BF @ self.W_dec


@pytest.fixture(scope="module", params=SPLICE_FAMILIES)
def tiny_lm(request):
    return request.param, tiny.make_model(request.param, VOCAB)


def _token_batches(n_batches: int = 2, S: int = 3, T: int = 12, seed: int = 0):
    """(tokens_ST, excluded_ST): BOS (id 0) at position 0, plus a few excluded 'special' positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        tokens_ST = torch.randint(3, VOCAB, (S, T), generator=g)
        tokens_ST[:, 0] = 0
        tokens_ST[0, 5 + b] = 1  # an EOS in the middle of a window
        excluded_ST = tokens_ST < 3
        out.append((tokens_ST, excluded_ST))
    return out


def _oracle(model, hook, replacement, batches):
    """Direct float64 CE/KL over scored predictions (source and target not excluded)."""
    ce_c, ce_n, kl, n = [], [], [], 0
    for tokens_ST, excluded_ST in batches:
        with torch.no_grad():
            clean = model(input_ids=tokens_ST).logits.double()
            if replacement is None:
                new = clean
            else:
                fn = lambda x: torch.where(excluded_ST[..., None], x, replacement(x))  # noqa: E731
                with hooks.patched(model, {hook: fn}):
                    new = model(input_ids=tokens_ST).logits.double()
        scored = ~excluded_ST[:, :-1] & ~excluded_ST[:, 1:]
        lp_c, lp_n = clean[:, :-1].log_softmax(-1)[scored], new[:, :-1].log_softmax(-1)[scored]
        y = tokens_ST[:, 1:][scored][:, None]
        ce_c.append(-lp_c.gather(1, y)), ce_n.append(-lp_n.gather(1, y))
        kl.append((lp_c.exp() * (lp_c - lp_n)).sum(-1))
        n += int(scored.sum())
    return torch.cat(ce_c).mean().item(), torch.cat(ce_n).mean().item(), torch.cat(kl).mean().item(), n


def test_identity_sae_recovers_everything(tiny_lm):
    _, model = tiny_lm
    hook = hooks.resolve_hook(model, "blocks.1.hook_resid_post")
    r = splice.spliced_ce_kl(model, hook, IdentitySAE(), _token_batches())
    assert r["ce_sae"] == r["ce_clean"] and r["kl_sae"] == 0.0
    assert r["ce_score"] == 1.0 and r["kl_score"] == 1.0
    # A random model is near-uniform, so zeroing may even lower CE; it must change the predictions.
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-4 and r["kl_zero"] > 1e-4
    # per batch: 3 rows x 10 predictions with a non-BOS source, minus the 2 that touch the mid EOS
    assert r["ce_n_predictions"] == 2 * (3 * 10 - 2) and r["ce_n_sequences"] == 6 and r["ce_n_tokens"] == 72


def test_zero_sae_scores_zero(tiny_lm):
    _, model = tiny_lm
    hook = hooks.resolve_hook(model, "blocks.0.hook_resid_pre")  # an input hook this time
    r = splice.spliced_ce_kl(model, hook, ZeroSAE(), _token_batches(), mean_x_D=torch.zeros(tiny.D_MODEL))
    assert r["ce_sae"] == r["ce_zero"] == r["ce_mean"] and r["kl_sae"] == r["kl_zero"]
    assert r["ce_score"] == 0.0 and r["kl_score"] == 0.0 and r["ce_score_mean"] == 0.0


def test_ce_clean_matches_hf_loss(tiny_lm):
    _, model = tiny_lm
    batches = _token_batches(n_batches=1)
    tokens_ST, excluded_ST = batches[0]
    hook = hooks.resolve_hook(model, "blocks.1.hook_resid_post")
    r = splice.spliced_ce_kl(model, hook, IdentitySAE(), batches)
    # HF shifts labels itself: logits[t] are scored against labels[t + 1]; -100 drops a prediction.
    labels_ST = tokens_ST.clone()
    labels_ST[:, 1:][excluded_ST[:, :-1] | excluded_ST[:, 1:]] = -100
    with torch.no_grad():
        hf_loss = model(input_ids=tokens_ST, labels=labels_ST).loss.item()
    assert r["ce_clean"] == pytest.approx(hf_loss, abs=1e-5)


def test_nonidentity_sae_matches_float64_oracle(tiny_lm, monkeypatch):
    _, model = tiny_lm
    monkeypatch.setattr(splice, "CHUNK_ELEMENTS", 7 * VOCAB)  # several chunks per batch, one ragged
    hook = hooks.resolve_hook(model, "blocks.1.hook_resid_post")
    sae, batches = LinearSAE(tiny.D_MODEL, 48), _token_batches()
    mean_x_D = torch.randn(tiny.D_MODEL, generator=torch.Generator().manual_seed(1))
    r = splice.spliced_ce_kl(model, hook, sae, batches, mean_x_D=mean_x_D)

    ce_clean, ce_sae, kl_sae, n = _oracle(model, hook, lambda x: sae.decode(sae.encode(x)), batches)
    _, ce_zero, kl_zero, _ = _oracle(model, hook, torch.zeros_like, batches)
    _, ce_mean, kl_mean, _ = _oracle(model, hook, lambda x: mean_x_D.expand_as(x), batches)
    assert r["ce_n_predictions"] == n
    for key, want in dict(
        ce_clean=ce_clean,
        ce_sae=ce_sae,
        ce_zero=ce_zero,
        ce_mean=ce_mean,
        kl_sae=kl_sae,
        kl_zero=kl_zero,
        kl_mean=kl_mean,
    ).items():
        assert r[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert kl_sae > 1e-4 and abs(ce_sae - ce_clean) > 1e-4  # the splice really changed the logits
    assert r["ce_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-4)
    assert r["kl_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-4)
    assert r["ce_score_mean"] == pytest.approx((ce_mean - ce_sae) / (ce_mean - ce_clean), rel=1e-4)


def test_excluded_positions_keep_clean_activation(tiny_lm):
    _, model = tiny_lm
    tokens_ST, excluded_ST = _token_batches(n_batches=1)[0]
    for name in ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_in"):
        hook = hooks.resolve_hook(model, name)
        clean_STD = hooks.capture(model, [hook], tokens_ST)[name]
        with splice.replaced(hook, splice.zero_replacement, excluded_ST):
            # capture's recorder is registered after the splice, so it sees the replaced tensor
            spliced_STD = hooks.capture(model, [hook], tokens_ST)[name]
            logits_STV = model(input_ids=tokens_ST).logits
        assert torch.equal(spliced_STD[excluded_ST], clean_STD[excluded_ST])
        assert spliced_STD[~excluded_ST].abs().max() == 0
        # Position 0 (BOS, excluded) only sees itself: its logits cannot change.
        with torch.no_grad():
            clean_logits_STV = model(input_ids=tokens_ST).logits
        assert torch.equal(logits_STV[:, 0], clean_logits_STV[:, 0])
        assert not torch.equal(logits_STV[:, 1:], clean_logits_STV[:, 1:])


def test_splice_rejects_non_sequence_hook_output(tiny_lm):
    _, model = tiny_lm
    tokens_ST, excluded_ST = _token_batches(n_batches=1)[0]
    hook = hooks.resolve_hook(model, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"\[S, T, D\]"):
        splice.spliced_ce_kl(model, hook, IdentitySAE(), [(tokens_ST, excluded_ST[:, :-1])])


# ---------------------------------------------------------------- evaluate() end to end

import json  # noqa: E402

from saeforge.config import DataConfig, EvalConfig  # noqa: E402
from saeforge.evals import evaluate, format_table, write_eval_json  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    lines = tiny._TEXT.splitlines()[:5]
    docs = [{"text": f"{lines[i % 5]} {lines[(i * 3) % 5]} item {i}\n{lines[(i + 2) % 5]}"} for i in range(80)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module", params=("llama", "gpt2"))
def tiny_loaded(request, tiny_model_dirs):
    from saeforge.models import load_model

    return load_model(str(tiny_model_dirs[request.param]), device="cpu")


def _cfgs(corpus_file, tokens=400, ce_tokens=200):
    data_cfg = DataConfig(corpus=str(corpus_file), context_size=20, holdout_fraction=0.5)
    return data_cfg, EvalConfig(tokens=tokens, ce_tokens=ce_tokens, batch_size=3)


def _heldout_windows(lm, data_cfg, n):
    from saeforge.data import iter_documents, pack_windows, split_documents

    docs = split_documents(iter_documents(data_cfg), data_cfg, "heldout")
    return torch.stack([w for _, w in zip(range(n), pack_windows(docs, lm.tokenizer, data_cfg))])


def test_evaluate_matches_direct_computation(tiny_loaded, corpus_file):
    from saeforge.data import excluded_mask

    lm = tiny_loaded
    data_cfg, eval_cfg = _cfgs(corpus_file)
    sae = LinearSAE(lm.d_model, 32)
    m = evaluate(lm, HOOK, sae, data_cfg, eval_cfg, progress=False)

    tokens_ST = _heldout_windows(lm, data_cfg, 20)  # 400 tokens / 20 per window
    excluded_ST = excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
    with torch.no_grad():
        x_ND = hooks.capture(lm.model, [HOOK], tokens_ST)[HOOK][~excluded_ST].double()
        f_NF = sae.encode(x_ND.float()).double()
        x_hat_ND = sae.decode(f_NF.float()).double()
    ev = 1 - (x_ND - x_hat_ND).pow(2).sum(1).mean() / (x_ND.pow(2).sum(1).mean() - x_ND.mean(0).pow(2).sum())
    assert m["n_windows"] == 20 and m["n_tokens"] == int((~excluded_ST).sum()) < 400
    assert m["explained_variance"] == pytest.approx(ev.item(), abs=1e-9)
    assert m["l0"] == pytest.approx((f_NF != 0).sum(1).double().mean().item(), abs=1e-12)
    torch.testing.assert_close(m["feature_freq"], (f_NF != 0).double().mean(0))

    # CE/KL read the first 10 windows, with the mean activation over the reconstruction tokens as baseline.
    ce_batches = [(tokens_ST[a : min(a + 3, 10)], excluded_ST[a : min(a + 3, 10)]) for a in range(0, 10, 3)]
    ce_clean, ce_sae, kl_sae, n = _oracle(
        lm.model, hooks.resolve_hook(lm.model, HOOK), lambda x: sae.decode(sae.encode(x)), ce_batches
    )
    _, ce_mean, _, _ = _oracle(
        lm.model, hooks.resolve_hook(lm.model, HOOK), lambda x: x_ND.mean(0).float().expand_as(x), ce_batches
    )
    assert m["ce_n_predictions"] == n and m["ce_n_sequences"] == 10
    assert m["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert m["ce_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert m["kl_sae"] == pytest.approx(kl_sae, rel=1e-4)
    assert m["ce_mean"] == pytest.approx(ce_mean, rel=1e-5)


def test_evaluate_identity_sae_is_perfect(tiny_loaded, corpus_file):
    data_cfg, eval_cfg = _cfgs(corpus_file)
    m = evaluate(tiny_loaded, HOOK, IdentitySAE(), data_cfg, eval_cfg, progress=False)
    assert m["explained_variance"] == 1.0 and m["mse"] == 0.0
    assert m["ce_score"] == 1.0 and m["kl_score"] == 1.0 and m["kl_sae"] == 0.0
    assert m["l0"] == pytest.approx(tiny_loaded.d_model, abs=0.5)  # dense identity code: ~all dims nonzero


def test_evaluate_width_mismatch_names_both_widths(tiny_loaded, corpus_file):
    data_cfg, eval_cfg = _cfgs(corpus_file)
    with pytest.raises(ValueError, match=rf"d_in=32.*width {tiny_loaded.d_model}"):
        evaluate(tiny_loaded, HOOK, LinearSAE(32, 8), data_cfg, eval_cfg, progress=False)


def test_evaluate_short_corpus_warns_and_reports_actual_count(tiny_loaded, corpus_file):
    data_cfg, eval_cfg = _cfgs(corpus_file, tokens=10**6, ce_tokens=40)
    available = len(_heldout_windows(tiny_loaded, data_cfg, 10**6))
    with pytest.warns(UserWarning, match="ran out"):
        m = evaluate(
            tiny_loaded,
            HOOK,
            LinearSAE(tiny_loaded.d_model, 16),
            data_cfg,
            eval_cfg,
            progress=False,
            mean_ablation=False,
        )
    assert 20 < available < 10**6 // 20
    assert m["n_windows"] == available and m["tokens_requested"] == 10**6
    assert m["ce_n_sequences"] == 2 and "ce_mean" not in m


def test_table_and_json(tiny_loaded, corpus_file, tmp_path):
    data_cfg, eval_cfg = _cfgs(corpus_file)
    m = evaluate(tiny_loaded, HOOK, LinearSAE(tiny_loaded.d_model, 16), data_cfg, eval_cfg, progress=False)
    table = format_table(m)
    for label, key in [
        ("explained variance", "explained_variance"),
        ("CE score (vs zero)", "ce_score"),
        ("KL score (vs zero)", "kl_score"),
        ("CE clean", "ce_clean"),
    ]:
        line = next(ln for ln in table.splitlines() if ln.startswith(label + " "))
        assert float(line.split()[-1]) == pytest.approx(m[key], abs=1e-4)
    assert f"never fired in {m['n_tokens']:,} tokens" in table
    col = table.splitlines()[0].index("value")  # every value starts in the header's value column
    assert all(ln[col - 2 : col] == "  " and ln[col] != " " for ln in table.splitlines()[2:])

    m["shrinkage_gamma"] = float("nan")
    path = write_eval_json(m, tmp_path / "run")
    saved = json.loads(path.read_text())  # strict JSON: NaN became null
    assert path.name == "eval.json" and sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]
    assert "feature_freq" not in saved and saved["shrinkage_gamma"] is None
    assert saved["ce_score"] == m["ce_score"] and saved["n_tokens"] == m["n_tokens"]
    assert sum(saved["log10_freq_hist_counts"]) == 16

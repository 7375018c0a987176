"""CE by position from the spliced pass vs a float64 oracle; evaluate()'s by_position block end to end."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from saeforge.evals import splice
from saeforge.models import hooks

VOCAB = 97
HOOK = "blocks.1.hook_resid_post"


class LinearSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)

    def encode(self, x_BD):
        return torch.relu(x_BD @ self.W_enc)

    def decode(self, f_BF):
        return f_BF @ self.W_dec


def test_ce_by_position_matches_float64_oracle(monkeypatch):
    monkeypatch.setattr(splice, "CHUNK_ELEMENTS", 5 * VOCAB)  # chunk boundaries inside windows
    model = tiny.make_model("llama", VOCAB)
    hook = hooks.resolve_hook(model, HOOK)
    sae = LinearSAE(tiny.D_MODEL, 40)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tokens_ST = torch.randint(3, VOCAB, (3, 10), generator=g)
        tokens_ST[:, 0] = 0
        tokens_ST[1, 4] = 1
        batches.append((tokens_ST, tokens_ST < 3))
    r = splice.spliced_ce_kl(model, hook, sae, batches, by_position=True)
    pos = r["ce_by_position"]
    assert sorted(pos) == ["ce_clean", "ce_n", "ce_sae", "ce_zero"]

    n_T = torch.zeros(10, dtype=torch.float64)
    want = {k: torch.zeros(10, dtype=torch.float64) for k in ("clean", "sae", "zero")}
    for tokens_ST, excluded_ST in batches:
        scored = ~excluded_ST[:, :-1] & ~excluded_ST[:, 1:]
        y = tokens_ST[:, 1:]
        with torch.no_grad():
            for name, repl in [
                ("clean", None),
                ("sae", lambda x: sae.decode(sae.encode(x))),
                ("zero", torch.zeros_like),
            ]:
                if repl is None:
                    logits = model(input_ids=tokens_ST).logits
                else:
                    fn = lambda x, repl=repl: torch.where(excluded_ST[..., None], x, repl(x))  # noqa: E731
                    with hooks.patched(model, {hook: fn}):
                        logits = model(input_ids=tokens_ST).logits
                nll = -logits.double()[:, :-1].log_softmax(-1).gather(2, y[..., None])[..., 0]
                want[name][:-1] += (nll * scored).sum(0)
        n_T[:-1] += scored.sum(0)
    assert pos["ce_n"] == n_T.tolist() and pos["ce_n"][0] == 0  # BOS-sourced predictions never count
    for name, w in want.items():
        torch.testing.assert_close(torch.tensor(pos[f"ce_{name}"], dtype=torch.float64), w, rtol=1e-5, atol=1e-5)
    # Per-position sums add up to the whole-set means.
    assert sum(pos["ce_sae"]) / sum(pos["ce_n"]) == pytest.approx(r["ce_sae"], rel=1e-9)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dirs):
    from saeforge.models import load_model

    return load_model(str(tiny_model_dirs["gpt2"]), device="cpu")


def test_evaluate_reports_positions_at_a_longer_context(tiny_loaded, text_corpus, tmp_path):
    from saeforge.config import DataConfig, EvalConfig
    from saeforge.evals import evaluate, write_eval_json

    data_cfg = DataConfig(corpus=str(text_corpus), context_size=48, holdout_fraction=0.5)
    eval_cfg = EvalConfig(tokens=48 * 12, ce_tokens=48 * 5, batch_size=4)
    m = evaluate(
        tiny_loaded, HOOK, LinearSAE(tiny_loaded.d_model, 32), data_cfg, eval_cfg, progress=False, position_buckets=6
    )
    bp = m["by_position"]
    assert bp["start"] == [0, 8, 16, 24, 32, 40] and bp["end"][-1] == 48
    assert sum(bp["rows"]) == m["n_tokens"] and sum(bp["ce_predictions"]) == m["ce_n_predictions"]
    assert all(ev == ev for ev in bp["explained_variance"]) and len(set(bp["explained_variance"])) == 6
    # The predictions-weighted mean of per-bucket CE is the whole-set CE.
    total = sum(n * ce for n, ce in zip(bp["ce_predictions"], bp["ce_sae"]) if n)
    assert total / m["ce_n_predictions"] == pytest.approx(m["ce_sae"], rel=1e-9)
    saved = json.loads(write_eval_json(m, tmp_path).read_text())
    assert saved["by_position"]["rows"] == bp["rows"]


class IdentitySAE(torch.nn.Module):
    def encode(self, x_BD):
        return x_BD

    def decode(self, f_BF):
        return f_BF


def test_identity_sae_is_perfect_at_every_position(tiny_loaded, text_corpus):
    from saeforge.config import DataConfig, EvalConfig
    from saeforge.evals import evaluate

    data_cfg = DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.5)
    m = evaluate(
        tiny_loaded,
        HOOK,
        IdentitySAE(),
        data_cfg,
        EvalConfig(tokens=32 * 4, ce_tokens=32 * 4, batch_size=4),
        progress=False,
        position_buckets=4,
    )
    assert m["by_position"]["explained_variance"] == [1.0] * 4
    assert m["by_position"]["ce_score"] == [1.0] * 4 and m["by_position"]["ce_score_mean"] == [1.0] * 4

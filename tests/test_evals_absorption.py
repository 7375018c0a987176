"""First-letter absorption (simplified, see evals/absorption.py) on a constructed SAE with known answers."""

from __future__ import annotations

import pytest
import torch

from saeforge.evals.absorption import absorption_scores, first_letter_tokens, main_latents


class LookupSAE(torch.nn.Module):
    """Returns a prescribed code for each known input row (nearest stored row): absorption by construction."""

    def __init__(self, X_ND, F_NF, W_dec_FD):
        super().__init__()
        self.register_buffer("X", X_ND)
        self.register_buffer("F", F_NF)
        self.W_dec = torch.nn.Parameter(W_dec_FD)

    def encode(self, x):
        return self.F[torch.cdist(x, self.X).argmin(1)]

    def decode(self, f):
        return f @ self.W_dec


def test_absorbed_and_missed_tokens_are_counted_exactly():
    D, N, n_train = 6, 200, 150
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 2  # letters a (0) and b (1), interleaved
    e = torch.eye(D)
    x = 3 * e[y] + 0.3 * torch.randn(N, D, generator=g)
    codes = torch.zeros(N, 4)
    codes[y == 1, 1] = 3.0  # b: its main latent always fires
    test_a = [i for i in range(n_train, N) if y[i] == 0]
    for i in range(N):
        if y[i] == 0:
            k = test_a.index(i) if i in test_a else -1
            if k < 0 or k % 2 == 0:
                codes[i, 0] = 3.0  # a's main latent (always in train, every other test token)
            elif k % 4 == 1:
                codes[i, 2] = 3.0  # absorbed: another latent along e_a carries it
            else:
                codes[i, 3] = 3.0  # missed, and the firing latent is orthogonal to the probe: not absorbed
    W_dec = torch.stack([e[0], e[1], e[0], e[3]])
    r = absorption_scores(LookupSAE(x, codes, W_dec), x, y, n_train=n_train, probe_steps=100)
    a, b = r["letters"]["a"], r["letters"]["b"]
    assert r["probe_test_accuracy"] == 1.0 and a["probe_correct"] == len(test_a) == 25
    assert a["main_latents"] == [0] and b["main_latents"] == [1]
    want_miss = sum(1 for k in range(25) if k % 2 == 1)
    want_absorbed = sum(1 for k in range(25) if k % 4 == 1)
    assert a["miss_rate"] == pytest.approx(want_miss / 25) and a["absorption_rate"] == pytest.approx(want_absorbed / 25)
    assert b["miss_rate"] == 0.0 and b["absorption_rate"] == 0.0
    assert r["absorption_rate"] == pytest.approx(want_absorbed / 25 / 2)


def test_main_latents_grow_while_f1_improves():
    # Letter tokens are split across latents 0 and 1 (each fires on half); latent 2 fires on everything.
    is_L = torch.tensor([True] * 8 + [False] * 8)
    f = torch.zeros(16, 3)
    f[:4, 0], f[4:8, 1], f[:, 2] = 2.0, 1.5, 0.1
    assert sorted(main_latents(f, is_L)) == [0, 1]
    assert main_latents(f, is_L, max_k=1) == [0]


def test_first_letter_tokens_are_words(tiny_tokenizer):
    ids, letters = first_letter_tokens(tiny_tokenizer, per_letter=5, min_per_letter=1)
    texts = [tiny_tokenizer.decode([i]) for i in ids.tolist()]
    assert len(texts) >= 2
    for t, c in zip(texts, letters.tolist()):
        assert t.strip().isalpha() and t.strip()[0].lower() == "abcdefghijklmnopqrstuvwxyz"[c]
    assert max(letters.bincount().tolist()) <= 5

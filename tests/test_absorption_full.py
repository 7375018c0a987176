"""SAEBench's first-letter absorption (groundtruth/absorption.py) on planted SAEs with known answers."""

from __future__ import annotations

import pytest
import torch

from saeforge.groundtruth.absorption import _scores, absorption_full

D = 12


def _planted(seed: int = 0):
    """Letters a, b, c (60 words each, every fifth tests) along e0, e1, e2, and a lookup "SAE" with:
    latent 0 = a's main (off on some test words of a), 1 = b's main (always on), c split over latents 2
    and 5 (each fires on half of c's words), one token-specific absorber per absorbed a word (decoder
    e0, latents 6..), and latent 3 (decoder -e0) on a's other missed words: off, but not absorbed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(180) % 3
    test = (torch.arange(180) // 3) % 5 == 4
    e = torch.eye(D)
    x = 3 * e[y] + 0.2 * torch.randn(180, D, generator=g)
    n_abs = 0
    codes, W = torch.zeros(180, 40), torch.zeros(40, D)
    W[0], W[1], W[2], W[5], W[3] = e[0], e[1], e[2], e[2], -e[0]
    test_a = [i for i in range(180) if y[i] == 0 and test[i]]
    kinds = {}
    for i in range(180):
        if y[i] == 1:
            codes[i, 1] = 3.0
        elif y[i] == 2:
            codes[i, 2 if (i // 3) % 2 == 0 else 5] = 3.0
        else:
            k = test_a.index(i) if i in test_a else -1
            if k >= 0 and k % 4 == 1:  # absorbed: its own latent along e0 carries the letter
                W[6 + n_abs] = e[0]
                codes[i, 6 + n_abs] = 3.0
                n_abs += 1
                kinds[i] = "absorbed"
            elif k >= 0 and k % 4 == 3:  # missed: only a latent pointing away from the probe fires
                codes[i, 3] = 1.0
                kinds[i] = "missed"
            else:
                codes[i, 0] = 3.0
    W[6 + n_abs :] = e[D - 1]  # unused latents: orthogonal to every probe

    def encode(x_):
        return codes[torch.cdist(x_.float(), x).argmin(1)]

    return x, y, test, encode, W, kinds, len(test_a)


def test_planted_absorption_rates_equal_the_planted_fractions():
    x, y, test, encode, W, kinds, n_test_a = _planted()
    r = absorption_full(x, y, test, encode, W)
    a, b, c = r["letters"]["a"], r["letters"]["b"], r["letters"]["c"]
    assert n_test_a == 12 and a["probe_true_positives"] == 12  # separable data: the probe finds every a
    assert a["main_latents"] == [0] and b["main_latents"] == [1] and not a["split"]
    n_absorbed = sum(v == "absorbed" for v in kinds.values())
    n_missed = sum(v == "missed" for v in kinds.values())
    assert (n_absorbed, n_missed) == (3, 3)
    assert a["full_absorption_rate"] == pytest.approx(3 / 12)
    assert a["absorption_fraction"] == pytest.approx(3 / 12)  # main off, absorber carries all of it: fraction 1
    assert a["miss_rate"] == pytest.approx(6 / 12)
    assert b["full_absorption_rate"] == 0.0 and b["absorption_fraction"] == 0.0 and b["miss_rate"] == 0.0
    assert c["full_absorption_rate"] == 0.0 and c["miss_rate"] == 0.0
    assert r["letters_scored"] == 3 and r["full_absorption"] == pytest.approx(3 / 12 / 3)


def test_feature_splitting_is_detected_when_two_latents_split_a_letter():
    x, y, test, encode, W, _, _ = _planted()
    r = absorption_full(x, y, test, encode, W)
    c = r["letters"]["c"]
    assert sorted(c["main_latents"]) == [2, 5] and c["split"] and r["split_letters"] == 1
    # k=1 catches half of c's test words: F1 = 2 * 6 / (6 + 12); k=2 all of them; k=3 adds nothing
    assert c["f1_by_k"][0] == pytest.approx(2 / 3, abs=1e-3) and c["f1_by_k"][1] == pytest.approx(1.0)
    assert c["main_f1"] == pytest.approx(1.0) and r["letters"]["b"]["main_f1"] == pytest.approx(1.0)
    # a larger jump threshold stops at one latent
    assert absorption_full(x, y, test, encode, W, f1_jump=0.5)["letters"]["c"]["main_latents"] in ([2], [5])


def test_thresholds_are_respected_on_hand_made_words():
    # one word with probe projection a = 1; latent 0 is the main latent, off
    f = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    cos = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5])

    def run(c, cos_=cos, f_=f, mains=(0,)):
        return _scores(1.0, torch.tensor(c), cos_, f_, list(mains))

    assert run([0.0, 0.41, 0.0, 0.0, 0.0]) == (True, 1.0)  # >= 40% of the projection, cos 0.5
    assert run([0.0, 0.39, 0.0, 0.0, 0.0]) == (False, 0.0)  # under 40%
    low_cos = torch.tensor([0.9, 0.024, 0.5, 0.5, 0.5])
    assert run([0.0, 0.41, 0.0, 0.0, 0.0], cos_=low_cos)[0] is False  # cos under 0.025: not full absorption
    assert (
        run([0.0, 0.41, 0.0, 0.0, 0.0], cos_=torch.tensor([0.9, 0.09, 0.5, 0.5, 0.5]))[1] == 0.0
    )  # fraction needs cos >= 0.1
    # partial: the main latent fires with m = 0.5, absorbers sum s = 0.45 (only the top 3 of 4 count)
    on = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    full, frac = run([0.5, 0.2, 0.15, 0.1, 0.05], f_=on)
    assert full is False and frac == pytest.approx(0.45 / 0.95)
    # absorbers explain more than is missing: capped at a - m
    assert run([0.5, 0.3, 0.3, 0.3, 0.0], f_=on)[1] == pytest.approx(0.5 / 1.0)
    # the main latents already carry the projection: nothing is absorbed
    assert run([1.2, 0.5, 0.5, 0.5, 0.0], f_=on)[1] == 0.0
    # a word the residual does not project onto positively is never absorbed
    assert _scores(-1.0, torch.tensor([0.0, 0.9, 0, 0, 0]), cos, f, [0]) == (False, 0.0)


def test_on_a_tiny_model_the_prompt_reads_the_word_and_the_table_has_a_row_per_letter(tiny_model_dirs):
    from saeforge.evals.splice import run_sae
    from saeforge.groundtruth.absorption import first_letter_absorption, format_absorption, prompt_activations
    from saeforge.models import capture, load_model, resolve_hook
    from saeforge.saes.registry import config_class, sae_class

    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    hook = resolve_hook(lm.model, "blocks.1.hook_resid_post")
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=128, k=8))
    sae.init_weights(torch.Generator().manual_seed(0))
    # the activation is read at the word, after BOS: the same as a direct forward of [BOS, word, suffix...]
    word = lm.tokenizer.encode(" fox", add_special_tokens=False)[0]
    suffix = lm.tokenizer.encode(" has the first letter:", add_special_tokens=False)
    direct = capture(lm.model, [hook], torch.tensor([[lm.tokenizer.bos_token_id, word, *suffix]]))[hook.name][0, 1]
    torch.testing.assert_close(prompt_activations(lm, hook, torch.tensor([word]))[0], direct.float())
    r = first_letter_absorption(lm, hook, sae, lambda x: run_sae(sae, x)[0])
    assert r["n_test"] == r["n_tokens"] // 5 and len(r["letters"]) >= 2  # the tiny vocabulary has a few letters
    for v in r["letters"].values():
        assert 1 <= len(v["main_latents"]) <= 10 and 0 <= v["probe_f1"] <= 1
        assert v["full_absorption_rate"] is None or 0 <= v["full_absorption_rate"] <= v["miss_rate"]
    table = format_absorption(r).splitlines()
    assert len(table) == 1 + len(r["letters"]) + 1 + 1 and table[-2].startswith("mean")

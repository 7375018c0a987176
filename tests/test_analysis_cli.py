"""`saeforge steer` and `saeforge attribute` on a saved tiny SAE whose cfg.json names a tiny model."""

from __future__ import annotations

import pytest
from test_analysis_splice import HOOK, make_sae

from saeforge.analysis.attribution import attribution_patching
from saeforge.analysis.common import load_for_analysis
from saeforge.analysis.metrics import LogitDiff
from saeforge.cli import main
from saeforge.saes.formats import save_sae


@pytest.fixture(scope="module")
def sae_dir(tiny_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis_cli") / "sae"
    save_sae(make_sae(), folder, {"model_name": str(tiny_model_dirs["llama"]), "hook_name": HOOK})
    return folder


def _single_tokens(tok, n=2):
    """Strings that encode back to exactly one token of the tiny tokenizer."""
    out = []
    for i in range(10, 400):
        s = tok.decode([i])
        if s.strip() and tok(s, add_special_tokens=False)["input_ids"] == [i]:
            out.append(s)
        if len(out) == n:
            return out
    raise AssertionError("no single-token strings found")


def test_steer_prints_both_generations(sae_dir, capsys):
    args = ["steer", "--sae", str(sae_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--quiet"]
    assert main([*args, "--feature", "5", "--alpha", "0"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("clean", "steered")))
    assert lines["clean"].strip() == lines["steered"].strip()  # alpha 0 changes nothing
    assert "feature 5: alpha +0 at all (decoder row norm 3) at blocks.1.hook_resid_post" in out
    assert main([*args, "--feature", "5", "--feature", "6", "--alpha", "40", "--positions", "last"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("clean", "steered")))
    assert lines["clean"] != lines["steered"] and "feature 6: alpha +40 at last" in out
    assert main([*args, "--feature", "96", "--alpha", "1"]) == 2
    assert "feature 96 is out of range: this SAE has 96 latents (0..95)" in capsys.readouterr().err
    assert main([*args, "--feature", "5", "--alpha", "1", "--hook", "model.layers.1.mlp.up_proj"]) == 2
    assert "width d_in=64" in capsys.readouterr().err


def test_attribute_prints_the_ranked_table_of_the_python_api(sae_dir, capsys):
    lm, sae, hook = load_for_analysis(sae_dir)
    target, other = _single_tokens(lm.tokenizer)
    prompts = ["def add(a, b):", "The quick brown fox"]
    args = [
        "attribute",
        "--sae",
        str(sae_dir),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--target",
        target,
        "--other",
        other,
        "--top",
        "5",
        "--quiet",
    ]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    t, o = (lm.tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in (target, other))
    want = attribution_patching(lm, sae, hook, prompts, LogitDiff(t, o)).ranked(5)
    assert [int(r[1]) for r in rows] == [f for f, _ in want]
    assert [float(r[2]) for r in rows] == pytest.approx([s for _, s in want], rel=1e-3)
    assert main([*args, "--method", "ig", "--steps", "4"]) == 0
    assert "integrated gradients (4 steps)" in capsys.readouterr().out
    assert main(["attribute", "--sae", str(sae_dir), "--prompt", "x", "--target", "def add", "--quiet"]) == 2
    assert "not one" in capsys.readouterr().err

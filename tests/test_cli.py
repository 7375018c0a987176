"""The saeforge command, run as a user runs it: real processes, a real kill, real files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tiny
import torch
from safetensors.torch import load_file

from saeforge.cli import main

pytestmark = pytest.mark.slow  # end to end through the CLI: real training runs, subprocesses, kills

HOOK = "blocks.1.hook_resid_post"


def saeforge(*args, check=True, **kw):
    """Run the console entry point in a child process (as `saeforge ...` would)."""
    cmd = [sys.executable, "-m", "saeforge.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return text_corpus


def train_args(model_dir, corpus, out, name, tokens=60_000):
    options = {"hook": HOOK, "tokens": tokens, "activations.shuffle_sequences": 64, "sae.d_sae": 4096, "sae.k": 8}
    options |= {"train.checkpoint_every_steps": 10, "train.log_every_steps": 5}
    return tiny.train_args(model_dir, corpus, out, name, options, "--no-eval", "--quiet")


def test_hooks_lists_canonical_names(tiny_model_dirs):
    out = saeforge("hooks", tiny_model_dirs["gpt2"]).stdout.split()
    assert "blocks.0.hook_resid_pre" in out and "blocks.2.hook_mlp_out" in out and len(out) == 3 * 5


def test_config_prints_json_that_round_trips(capsys):
    assert main(["config", "--arch", "relu", "--sae.l1_coefficient", "3", "--tokens", "5e5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sae"]["architecture"] == "relu" and d["sae"]["l1_coefficient"] == 3.0
    assert d["train"]["total_tokens"] == 500_000


def test_every_subcommand_prints_its_help(capsys):
    from saeforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "compare", "cache", "index", "config"} <= set(sub.choices)  # those with % in a help
    for name, parser in sub.choices.items():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0, name
        assert out.startswith(f"usage: saeforge {name}"), (name, out[:200])
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        assert "--help" in options and len(options) > 1, name
        missing = [o for o in options if o not in out]
        assert not missing, (name, missing)
    # the SAE options follow --arch: relu's own field is offered, topk's k is not
    with pytest.raises(SystemExit):
        main(["train", "--arch", "relu", "--help"])
    out = capsys.readouterr().out
    assert "--sae.l1_coefficient" in out and "--sae.k " not in out and "(~20-35% faster forward" in out


def test_bad_inputs_give_clear_errors(tiny_model_dirs, corpus, tmp_path, capsys):
    model = tiny_model_dirs["llama"]
    base = [
        "train",
        "--model",
        model,
        "--corpus",
        corpus,
        "--data.holdout_fraction",
        0.2,
        "--train.out_dir",
        tmp_path,
        "--quiet",
    ]
    assert main([*base, "--hook", "blocks.9.hook_resid_post"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err
    assert main([*base, "--hook", "blocks.1.hook_resid_middle"]) == 2
    err = capsys.readouterr().err
    assert "hook_resid_middle" in err and "hook_resid_post" in err and "hook_mlp_out" in err
    assert main([*base, "--hook", HOOK, "--corpus", tmp_path / "nope.txt"]) == 2
    assert "nope.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main([*base, "--hook", HOOK, "--corpus", empty]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert main([*base, "--hook", HOOK, "--train.lr", "fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main([*base, "--hook", HOOK, "--sae.k", "0"]) == 2
    assert "k" in capsys.readouterr().err
    assert main(["train", "--config", tmp_path / "missing.json"]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """UserError subclasses are the user's to fix (exit 2, one line); any other exception is ours and propagates."""
    import saeforge.training.commands as commands

    assert main(["train", "--train.lr", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err == "saeforge: error: train.lr must be positive\n"

    def broken_train(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # what a bug deep in training looks like

    monkeypatch.setattr(commands, "train", broken_train)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["train", "--quiet"])


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dirs, corpus, tmp_path):
    model = tiny_model_dirs["llama"]
    saeforge(*train_args(model, corpus, tmp_path, "full"))
    full = load_file(tmp_path / "full" / "sae" / "sae_weights.safetensors")

    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", *map(str, train_args(model, corpus, tmp_path, "cut"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    step = torch.load(ckpt, weights_only=True)["step"]
    n_steps = -(-60_000 // 256)
    assert 0 < step < n_steps
    assert not (tmp_path / "cut" / "sae").exists()

    # a second start without --resume refuses to overwrite the run
    again = saeforge(*train_args(model, corpus, tmp_path, "cut"), check=False)
    assert again.returncode == 2 and "--resume" in again.stderr

    saeforge("train", "--resume", tmp_path / "cut", "--no-eval", "--quiet")
    resumed = load_file(tmp_path / "cut" / "sae" / "sae_weights.safetensors")
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == n_steps


def test_train_from_cache_then_eval(tiny_model_dirs, corpus, tmp_path):
    model = tiny_model_dirs["gpt_neox"]
    common = [
        "--model",
        model,
        "--hook",
        HOOK,
        "--corpus",
        corpus,
        "--data.context_size",
        64,
        "--data.holdout_fraction",
        0.2,
        "--quiet",
    ]
    saeforge("cache", "--out", tmp_path / "cache", "--tokens", 8000, "--activations.shard_rows", 3000, *common)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_rows"] >= 8000 and len(manifest["shards"]) >= 3
    out = saeforge(
        "train",
        *common,
        "--activations.cache",
        tmp_path / "cache",
        "--tokens",
        16000,
        "--activations.batch_size",
        256,
        "--sae.d_sae",
        256,
        "--sae.k",
        8,
        "--train.out_dir",
        tmp_path,
        "--name",
        "c",
        "--eval.tokens",
        2048,
        "--eval.ce_tokens",
        1024,
    ).stdout
    assert "explained variance" in out and "CE score" in out
    ev = json.loads((tmp_path / "c" / "sae" / "eval.json").read_text())
    assert 0.3 < ev["explained_variance"] <= 1.0 and ev["l0"] == pytest.approx(8.0, abs=1e-9)
    # `saeforge eval` rebuilds the same held-out split from the saved config and agrees
    out2 = saeforge("eval", tmp_path / "c" / "sae", "--eval.tokens", 2048, "--eval.ce_tokens", 1024, "--quiet").stdout
    ev2 = json.loads((tmp_path / "c" / "sae" / "eval.json").read_text())
    assert "wrote" in out2 and ev2["explained_variance"] == pytest.approx(ev["explained_variance"], rel=1e-6)
    assert ev2["ce_score"] == pytest.approx(ev["ce_score"], rel=1e-5)


def test_eval_on_another_corpus_keeps_the_training_result(tiny_model_dirs, corpus, tmp_path, capsys):
    import difflib  # noqa: E401
    import heapq
    import inspect
    import pprint
    import random
    import string

    from saeforge.evals.saved import corpus_slug

    other = tmp_path / "other"  # a second corpus: other standard-library modules
    other.mkdir()
    for mod in (difflib, heapq, pprint, random, string):
        (other / f"{mod.__name__}.txt").write_text(inspect.getsource(mod))
    small = ["--eval.tokens", 1024, "--eval.ce_tokens", 256, "--quiet"]
    args = [a for a in train_args(tiny_model_dirs["llama"], corpus, tmp_path, "r", tokens=4096) if a != "--no-eval"]
    assert main([str(a) for a in [*args, "--sae.d_sae", 256, *small]]) == 0
    sae_dir = tmp_path / "r" / "sae"
    trained = (sae_dir / "eval.json").read_bytes()
    own = json.loads(trained)
    assert own["corpus"] == str(corpus)
    capsys.readouterr()

    assert main([str(a) for a in ["eval", sae_dir, "--data.corpus", other, "--report", *small]]) == 0
    out = capsys.readouterr().out
    assert (sae_dir / "eval.json").read_bytes() == trained  # the training result is untouched
    slug = corpus_slug(str(other))
    assert slug.startswith("other-") and len(slug) == len("other-") + 8
    elsewhere = json.loads((sae_dir / f"eval.{slug}.json").read_text())
    assert (sae_dir / f"report.{slug}.html").exists() and not (sae_dir / "report.html").exists()
    assert f"wrote {sae_dir / f'eval.{slug}.json'} and {sae_dir / f'report.{slug}.html'}" in out
    corpus_line = next(ln for ln in out.splitlines() if ln.startswith("corpus (held-out part)"))
    assert corpus_line.split()[-1] == str(other)
    assert elsewhere["corpus"] == str(other) and elsewhere["n_tokens"] > 0
    for key in ("explained_variance", "ce_clean", "mse"):
        assert elsewhere[key] != own[key], key  # other text, other numbers

    # --out puts it where the user says; the SAE folder gains nothing
    before = sorted(p.name for p in sae_dir.iterdir())
    assert (
        main([str(a) for a in ["eval", sae_dir, "--data.corpus", other, "--out", tmp_path / "mine.json", *small]]) == 0
    )
    assert json.loads((tmp_path / "mine.json").read_text())["explained_variance"] == elsewhere["explained_variance"]
    assert sorted(p.name for p in sae_dir.iterdir()) == before and not (tmp_path / "mine.html").exists()
    capsys.readouterr()
    assert main([str(a) for a in ["eval", sae_dir, "--out", tmp_path / "page.html", *small]]) == 2
    assert "name the JSON file" in capsys.readouterr().err

    # the own corpus, spelled another way (trailing slash), is still the training result's file
    assert main([str(a) for a in ["eval", sae_dir, "--data.corpus", f"{corpus}/", *small]]) == 0
    again = json.loads((sae_dir / "eval.json").read_text())
    assert again["explained_variance"] == pytest.approx(own["explained_variance"], rel=1e-6)
    assert sorted(p.name for p in sae_dir.glob("eval*.json")) == sorted(["eval.json", f"eval.{slug}.json"])


def test_sae_on_a_model_of_another_width_is_refused(tiny_model_dirs, corpus, tmp_path, capsys):
    from tiny import make_model, make_tokenizer

    saeforge(*train_args(tiny_model_dirs["llama"], corpus, tmp_path, "w", tokens=2048))
    wide = tmp_path / "wide"
    tok = make_tokenizer()
    m = make_model("llama", len(tok))
    cfg = m.config
    cfg.hidden_size, cfg.head_dim = 96, 24
    type(m)(cfg).save_pretrained(wide)
    tok.save_pretrained(wide)
    assert main(["eval", str(tmp_path / "w" / "sae"), "--model", str(wide), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "64" in err and "96" in err

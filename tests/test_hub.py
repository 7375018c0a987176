"""hf:// loading and `saeforge push`, against huggingface_hub itself.

Downloads read a Hugging Face cache laid out by hand (models--OWNER--REPO/refs, snapshots, blobs: the
layout huggingface_hub documents and reads offline) with HF_HUB_OFFLINE=1, or come from tests/hubserver.py,
a loopback server speaking the Hub's endpoints, which also receives the pushes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch
from hubserver import FakeHub
from huggingface_hub import constants
from safetensors.torch import save_file

from saeforge.cli import main
from saeforge.evals.push import model_card, push_sae
from saeforge.saes import hub
from saeforge.saes.formats import load_sae, load_sparsity, save_sae
from saeforge.saes.hub import HubError, HubSpec, local_sae_dir, output_dir, parse_hf
from saeforge.saes.interop import load_foreign
from saeforge.saes.topk import TopKConfig, TopKSAE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EVAL = {"model": "tiny-llama", "hook": "blocks.1.hook_resid_post", "n_tokens": 4096, "n_windows": 64}
EVAL |= {"explained_variance": 0.8125, "l0": 7.25, "mse": 0.03125, "corpus": "stdlib"}


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """An empty HF cache of our own, online, a token, and no resolution remembered from another test."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub._download.cache_clear()
    yield cache
    hub._download.cache_clear()


def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._download.cache_clear()


def endpoint(monkeypatch, url):
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # constants are read at import: patch them too
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def sae_dir(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    meta = {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post", "training_tokens": 123456}
    folder = save_sae(sae, tmp_path / "run" / "sae", meta, sparsity_F=torch.linspace(-5, -1, 16))
    (folder / "eval.json").write_text(json.dumps(EVAL))
    return folder


def write_cache(cache, repo_id, files: dict[str, bytes], revision="main", commit=COMMIT):
    """A repo in the HF cache as huggingface_hub lays it out: blobs by hash, a snapshot of links, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def folder_files(folder, prefix=""):
    return {prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_parse_hf_spec():
    assert parse_hf("hf://me/saes") == HubSpec("me/saes", "", None)
    assert parse_hf("hf://me/saes/a/b.c@v1") == HubSpec("me/saes", "a/b.c", "v1")
    assert str(parse_hf("hf://me/saes/layer3@main")) == "hf://me/saes/layer3@main"
    assert output_dir("hf://me/saes/layer3@v1").as_posix() == "hf/me/saes/layer3@v1"
    assert output_dir("runs/x/sae").as_posix() == "runs/x/sae"
    for bad in ("hf://me", "hf://me/saes@", "hf://me/saes/../x", "hf:///saes"):
        with pytest.raises(HubError, match="hf://OWNER/REPO"):
            parse_hf(bad)


def test_hf_spec_loads_from_the_offline_cache_bit_for_bit(hf, sae_dir, tmp_path, monkeypatch):
    files = folder_files(sae_dir, "layer1/")
    files["other/huge.bin"] = b"x" * 1000  # another folder of the repo: never needed
    write_cache(hf, "me/saes", files)
    offline(monkeypatch)

    local = load_sae(sae_dir)
    for spec in ("hf://me/saes/layer1", "hf://me/saes/layer1@main", f"hf://me/saes/layer1@{COMMIT}"):
        got = load_sae(spec)
        assert got.state_dict().keys() == local.state_dict().keys()
        for k, v in local.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    assert torch.equal(load_sparsity("hf://me/saes/layer1"), torch.linspace(-5, -1, 16))
    assert local_sae_dir("hf://me/saes/layer1") == hf / "models--me--saes" / "snapshots" / COMMIT / "layer1"
    via_interop = load_foreign("hf://me/saes/layer1")
    assert torch.equal(via_interop.W_dec, local.W_dec)


def test_a_sparsify_folder_loads_from_the_cache(hf, monkeypatch):
    g = torch.Generator().manual_seed(3)
    t = {"encoder.weight": torch.randn(12, 4, generator=g), "encoder.bias": torch.randn(12, generator=g)}
    t |= {"W_dec": torch.randn(12, 4, generator=g), "b_dec": torch.randn(4, generator=g)}
    cfg = {"activation": "topk", "num_latents": 12, "k": 3, "d_in": 4, "transcode": False, "skip_connection": False}
    local = hf.parent / "sparsify" / "layers.2"
    local.mkdir(parents=True)
    save_file(t, str(local / "sae.safetensors"))
    (local / "cfg.json").write_text(json.dumps(cfg))
    write_cache(hf, "eleuther/sae-tiny", folder_files(local, "layers.2/"))
    offline(monkeypatch)

    sae = load_foreign("hf://eleuther/sae-tiny/layers.2")
    x = torch.randn(5, 4, generator=g)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify's own formula
    vals, idx = pre.topk(3, dim=-1)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals))


def test_cli_errors_name_what_to_do(hf, sae_dir, monkeypatch, capsys):
    write_cache(hf, "me/saes", folder_files(sae_dir, "layer1/"))
    offline(monkeypatch)

    def error(*argv):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err  # one line, no traceback
        return err

    err = error("eval", "hf://me/saes/layer9", "--quiet")
    assert "no SAE files at 'layer9'" in err and "check the path" in err
    write_cache(hf, "me/half", {"layer1/cfg.json": (sae_dir / "cfg.json").read_bytes()})  # weights never pushed
    err = error("eval", "hf://me/half/layer1", "--quiet")
    assert "has cfg.json but no weights file" in err and "push the SAE again" in err
    err = error("eval", "hf://me/saes/layer1@v2", "--quiet")  # a revision never downloaded
    assert "HF_HUB_OFFLINE=1" in err and "set HF_HUB_OFFLINE=0" in err and "'v2'" in err
    err = error("steer", "--sae", "hf://me/other", "--feature", "0", "--alpha", "1", "--prompt", "hi")
    assert "not in the HF cache" in err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but nothing listens at the endpoint
    hub._download.cache_clear()
    endpoint(monkeypatch, "http://127.0.0.1:9")
    err = error("index", "hf://me/other/x", "--quiet")
    assert "cannot be reached" in err and "check the network" in err

    with FakeHub() as server:
        endpoint(monkeypatch, server.endpoint)
        server.repos["me/saes"] = {"main": [("f" * 40, {"layer1/cfg.json": b"{}"})]}
        err = error("eval", "hf://me/saes/layer1@nope", "--quiet")
        assert "has no revision 'nope'" in err and "existing branch, tag or commit" in err
        err = error("eval", "hf://me/missing/layer1", "--quiet")
        assert "repository me/missing not found" in err and "check OWNER/REPO" in err


def test_saelens_releases_need_sae_lens(hf, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # not importable, even where it is installed
    with pytest.raises(HubError, match="install sae-lens .* or pass hf://REPO_ID/PATH"):
        local_sae_dir("saelens://gpt2-small-res-jb/blocks.0.hook_resid_pre")


def test_saelens_release_resolves_through_its_registry(hf, sae_dir, monkeypatch, tmp_path):
    """A stand-in for sae_lens's registry module (the third-party API: get_pretrained_saes_directory)."""
    pkg = tmp_path / "fake_site" / "sae_lens" / "loading"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pretrained_saes_directory.py").write_text(
        "from types import SimpleNamespace\n"
        "def get_pretrained_saes_directory():\n"
        "    return {'tiny-res': SimpleNamespace(release='tiny-res', repo_id='me/saes',"
        " saes_map={'blocks.1.hook_resid_post': 'layer1'})}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    for name in [m for m in sys.modules if m.startswith("sae_lens")]:
        monkeypatch.delitem(sys.modules, name)
    write_cache(hf, "me/saes", folder_files(sae_dir, "layer1/"))
    offline(monkeypatch)
    got = load_sae("saelens://tiny-res/blocks.1.hook_resid_post")
    assert torch.equal(got.W_enc, load_sae(sae_dir).W_enc)
    with pytest.raises(HubError, match="has no SAE 'blocks.9'"):
        local_sae_dir("saelens://tiny-res/blocks.9")


def test_push_uploads_the_folder_and_a_card_then_hf_loads_it_back(hf, sae_dir, monkeypatch):
    with FakeHub() as server:
        endpoint(monkeypatch, server.endpoint)
        url = push_sae(sae_dir, "me/saes", path="layer1")
        got = server.files("me/saes")
        sent = ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json"]
        assert sorted(got) == sorted(f"layer1/{n}" for n in [*sent, "README.md"])
        for name in sent:
            assert got[f"layer1/{name}"] == (sae_dir / name).read_bytes(), name
        card = got["layer1/README.md"].decode()
        assert card == model_card(sae_dir, "me/saes", "layer1")
        assert "| explained variance | 0.8125 |" in card and "| L0 | 7.25 |" in card
        assert "| training tokens | 123,456 |" in card and "topk (SAELens: topk)" in card
        assert 'load_sae("hf://me/saes/layer1")' in card and "SAE.load_from_disk(root" in card
        assert url == f"{server.endpoint}/me/saes/commit/{server.repos['me/saes']['main'][-1][0]}"
        assert server.commits[-1]["summary"].startswith("saeforge push: topk SAE, tiny-llama")

        # downloaded through huggingface_hub from the loopback hub: only this SAE's files
        server.repos["me/saes"]["main"][-1][1]["other/huge.bin"] = b"x" * 1000
        local = local_sae_dir("hf://me/saes/layer1")
        assert sorted(p.name for p in local.iterdir()) == sorted([*sent])
        assert not (local.parent / "other").exists()
        assert torch.equal(load_sae("hf://me/saes/layer1").W_dec, load_sae(sae_dir).W_dec)

        # a second push to a branch, at the repo root: the card goes to README.md there
        push_sae(sae_dir, "me/saes", revision="v2")
        assert "README.md" in server.files("me/saes", "v2") and "README.md" not in server.files("me/saes")
        assert server.validated == [server.files("me/saes", "v2")["README.md"].decode()]  # its YAML was checked
    offline(monkeypatch)  # the first download is in the cache now
    assert torch.equal(load_sae("hf://me/saes/layer1@main").W_dec, load_sae(sae_dir).W_dec)


def test_card_without_eval_and_with_undefined_metrics(sae_dir):
    (sae_dir / "eval.json").unlink()
    assert "No eval.json in the folder: run `saeforge eval SAE_DIR`" in model_card(sae_dir, "me/saes")
    (sae_dir / "eval.json").write_text(json.dumps({**EVAL, "explained_variance": None}))  # NaN is written as null
    card = model_card(sae_dir, "me/saes", revision="v2")
    assert "| L0 | 7.25 |" in card and "explained variance" not in card
    assert 'load_sae("hf://me/saes@v2")' in card and "snapshot_download(\"me/saes\", revision='v2')" in card


def test_push_errors(hf, sae_dir, tmp_path, monkeypatch, capsys):
    endpoint(monkeypatch, "http://127.0.0.1:9")
    assert main(["push", str(sae_dir), "--repo", "me/saes"]) == 2
    assert "cannot reach the Hub" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nowhere"), "--repo", "me/saes"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["push", str(sae_dir), "--repo", "saes"]) == 2
    assert "expected OWNER/REPO" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_and_index_of_a_pushed_sae_by_hf_spec(hf, tiny_model_dirs, text_corpus, tmp_path, monkeypatch, capsys):
    """Train a tiny SAE, push it, then eval and index it by hf://: same numbers, files under hf/, cache untouched."""
    from saeforge.viewer.db import FeatureDB

    small = ["--eval.tokens", "1024", "--eval.ce_tokens", "256", "--quiet"]
    data = ["--data.context_size", "64", "--data.holdout_fraction", "0.2"]
    train = ["train", "--model", str(tiny_model_dirs["llama"]), "--hook", "blocks.1.hook_resid_post"]
    train += ["--corpus", str(text_corpus), *data, "--tokens", "4096", "--activations.batch_size", "256"]
    train += ["--sae.d_sae", "64", "--sae.k", "4", "--train.out_dir", str(tmp_path / "runs"), "--name", "r", *small]
    assert main(train) == 0
    sae_dir = tmp_path / "runs" / "r" / "sae"
    local_eval = json.loads((sae_dir / "eval.json").read_text())
    monkeypatch.chdir(tmp_path)
    with FakeHub() as server:
        endpoint(monkeypatch, server.endpoint)
        assert main(["push", str(sae_dir), "--repo", "me/tiny", "--path", "r"]) == 0
        assert "load_sae('hf://me/tiny/r')" in capsys.readouterr().out
        assert main(["eval", "hf://me/tiny/r", *small]) == 0
    hub_eval = json.loads((tmp_path / "hf" / "me" / "tiny" / "r" / "eval.json").read_text())
    for key in ("explained_variance", "l0", "mse", "ce_score", "kl_score", "n_tokens"):
        assert hub_eval[key] == local_eval[key], key  # the same SAE on the same held-out tokens
    cached = local_sae_dir("hf://me/tiny/r")
    assert json.loads((cached / "eval.json").read_text()) == local_eval  # the cache keeps the pushed file

    offline(monkeypatch)
    assert main(["index", "hf://me/tiny/r", "--tokens", "2048", "--top-k", "4", *data, "--quiet"]) == 0
    db = FeatureDB(tmp_path / "hf" / "me" / "tiny" / "r" / "features.db")
    assert db.meta["sae_dir"] == "hf://me/tiny/r" and db.meta["sae_id"] == "r" and db.meta["d_sae"] == 64
    assert not (cached / "features.db").exists()

    steer = ["--feature", "0", "--alpha", "8", "--prompt", "def f(x):", "--max-new-tokens", "4"]
    capsys.readouterr()
    assert main(["steer", "--sae", "hf://me/tiny/r", *steer]) == 0
    by_spec = capsys.readouterr().out
    assert main(["steer", "--sae", str(sae_dir), *steer]) == 0
    assert by_spec == capsys.readouterr().out.replace(str(sae_dir), "hf://me/tiny/r")  # same generations
    assert main(["compare", str(sae_dir), "hf://me/tiny/r", "--out", "cmp.html", *small]) == 0
    rows = json.loads((tmp_path / "cmp.json").read_text())["saes"]
    assert [r["dir"] for r in rows] == [str(sae_dir), "hf://me/tiny/r"]
    assert rows[0]["explained_variance"] == rows[1]["explained_variance"] == local_eval["explained_variance"]

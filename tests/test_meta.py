"""Meta-SAEs: trained on planted decoder rows (each the sum of 2 of 8 shared directions plus noise), the
meta-SAE's decoder recovers the 8 shared directions and each base feature's meta-latents are its pair."""

import json

import pytest
import torch

from saeforge.cli import main
from saeforge.evals.dictionaries import max_cosine, mmcs
from saeforge.saes.formats import load_sae, save_sae
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.meta import DecoderRows, meta_latents

D, S, F = 32, 8, 64


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    dirs_SD = torch.randn(S, D, generator=g)
    dirs_SD /= dirs_SD.norm(dim=1, keepdim=True)
    pairs_F2 = torch.stack([torch.randperm(S, generator=g)[:2] for _ in range(F)])
    W_FD = dirs_SD[pairs_F2[:, 0]] + dirs_SD[pairs_F2[:, 1]] + 0.05 * torch.randn(F, D, generator=g)
    W_FD *= torch.rand(F, 1, generator=g) + 0.5  # row norms differ: the meta-SAE sees unit rows
    base = sae_class("relu")(config_class("relu")(d_in=D, d_sae=F))
    with torch.no_grad():
        base.W_dec.copy_(W_FD)
    root = tmp_path_factory.mktemp("meta")
    save_sae(base, root / "base", {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post"})
    return {"root": root, "dirs": dirs_SD, "pairs": pairs_F2, "W": W_FD}


def test_decoder_rows_are_unit_and_every_epoch_covers_each_row_once():
    W = torch.arange(1.0, 21.0).view(10, 2)
    it = iter(DecoderRows(W, 5, seed=1))
    epoch = torch.cat([next(it), next(it)])
    assert epoch.shape == (10, 2)
    torch.testing.assert_close(epoch.norm(dim=1), torch.ones(10))
    unit = W / W.norm(dim=1, keepdim=True)
    assert sorted(epoch[:, 0].tolist()) == sorted(unit[:, 0].tolist())


@pytest.fixture
def one_thread():
    # a 32 x 8 SAE: thread hand-offs cost more than the arithmetic (100 steps: 2 s on 1 thread, 15 s on a busy 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_meta_sae_recovers_planted_shared_directions(planted, capsys, one_thread):
    out = planted["root"] / "meta"
    args = ["meta", str(planted["root"] / "base"), "--out", str(out), "--sae.d_sae", "8", "--sae.k", "2"]
    assert main([*args, "--tokens", "6400", "--train.lr", "0.01", "--quiet"]) == 0
    assert "meta-SAE saved" in capsys.readouterr().out
    meta = load_sae(out)
    assert meta.d_sae == 8 and meta.d_in == D
    assert mmcs(planted["dirs"], meta.W_dec) > 0.9
    cfg = json.loads((out / "cfg.json").read_text())["metadata"]
    assert cfg["meta_inputs"] == "decoder_rows" and cfg["meta_base_sae"] == str((planted["root"] / "base").resolve())
    assert cfg["meta_base_d_sae"] == F and cfg["meta_base_hook"] == "blocks.0.hook_resid_post"
    # each base feature's two strongest meta-latents are the meta rows nearest its planted pair
    nearest_S = (max_cosine(meta.W_dec, planted["dirs"]) > 0.9).nonzero().flatten()
    assert len(nearest_S) == 8
    to_dir = (meta.W_dec.detach() @ planted["dirs"].T).argmax(1).tolist()
    rows = meta_latents(meta, planted["W"], top=2)
    got = {}
    for f, _, latent, _ in rows:
        got.setdefault(f, set()).add(to_dir[latent])
    right = sum(got.get(f, set()) == set(planted["pairs"][f].tolist()) for f in range(F))
    assert right >= 0.9 * F, right

    # a second run never replaces the first by accident
    assert main([*args, "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_errors_exit_2(planted, tmp_path, capsys):
    base = str(planted["root"] / "base")
    assert main(["meta", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert main(["meta", base, "--out", str(tmp_path / "m"), "--sae.d_sae", "64", "--quiet"]) == 2
    assert "narrower" in capsys.readouterr().err
    assert main(["meta", base, "--out", str(tmp_path / "m"), "--db", str(tmp_path / "none.db"), "--quiet"]) == 2
    assert "saeforge index" in capsys.readouterr().err
    assert main(["meta", base, "--out", str(tmp_path / "m"), "--arch", "topk", "--quiet"]) == 2
    assert main(["meta", base, "--out", str(tmp_path / "m"), "--top", "0", "--quiet"]) == 2
    assert not (tmp_path / "m").exists()

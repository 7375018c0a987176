"""Data-parallel training on the bf16 path (bf16 LM + bf16 autocast), forced on any CPU with SAEFORGE_BF16_FAST=1.

Every GPU run takes this path and so do AVX512-BF16 CPUs; tests/test_distributed.py pins float32 for its 1e-5
tolerances, so this module covers bf16 on every machine. Kept small: where the CPU lacks AVX512-BF16, torch
emulates bf16 (~4x slower than float32). Same worker, model and batches as test_distributed.py (2 gloo ranks,
64 steps of a global batch of 256).
"""

from pathlib import Path

import pytest
import torch
from dp_worker import TOKENS, B, run_config, train_one
from test_distributed import finish, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARCHS = ("topk", "batchtopk")  # per-row and whole-batch (global threshold) selection
U = 2.0**-8  # bf16 unit roundoff: an 8-bit significand, so one rounding moves a value by at most 2^-8 relative


@pytest.fixture(scope="module", autouse=True)
def bf16_auto():
    """auto = bf16 for this module: in this process and in the torchrun workers (they inherit os.environ)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEFORGE_BF16_FAST", "1")
        yield


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, text_corpus, tmp_path_factory):
    from saeforge.models import load_model

    out = tmp_path_factory.mktemp("dp_bf16")
    model, corpus = str(tiny_model_dirs["llama"]), str(text_corpus)
    finish(torchrun(Path(__file__).with_name("dp_worker.py"), out, model, corpus, *ARCHS))
    ranks = {arch: [torch.load(out / f"{arch}-rank{r}.pt", weights_only=True) for r in (0, 1)] for arch in ARCHS}
    lm = load_model(model, dtype="auto", device="cpu")
    assert lm.dtype is torch.bfloat16
    return ranks, train_one(lm, model, corpus, "topk"), (model, corpus)


@pytest.mark.parametrize("arch", ARCHS)
def test_ranks_hold_bit_identical_saes_under_bf16(runs, arch):
    r0, r1 = runs[0][arch]
    # auto really chose bf16 in the workers: the LM's dtype and the trainer's autocast flag
    assert (r0["lm_dtype"], r0["autocast"]) == (r1["lm_dtype"], r1["autocast"]) == ("bfloat16", True)
    assert r0["step"] == r1["step"] == TOKENS // B
    # Rounding differs between ranks' halves of the batch, but the all-reduced gradient and the global batch
    # statistics are the same numbers on both ranks, so both apply the same update: any drift would grow.
    for name, t in r0["sae"].items():
        assert torch.equal(t, r1["sae"][name]), name
    for key in ("late_fired", "tokens_since_fired"):
        assert torch.equal(r0[key], r1[key]), key


def test_two_processes_stay_within_bf16_rounding_of_one_process(runs):
    """Tolerance, per parameter: ||W_2proc - W_1proc|| <= 4u ||W_1proc - W_init|| (4u = 2^-6 ~ 1.6e-2).

    Both runs start from the same init and see the same rows. Under autocast each side's gradient product is
    rounded to bf16 once: relative error <= u for one process (whole batch), <= u per rank before the float32
    all-reduce, so the two gradients differ by <= 2u relative. A relative change d of every gradient moves Adam's
    m by d and sqrt(v) by d, so the step m/sqrt(v) by <= 2d = 4u. Summed over the run, to first order (ignoring
    feedback through the slightly different weights), the difference is <= 4u of the total displacement.
    Measured here: 1.4e-3 (W_enc), 2.2e-3 (W_dec), 4.8e-4 (b_enc), 2.4e-5 (b_dec), i.e. <= 0.6u. BatchTopK is not
    held to it: its one threshold over the whole batch turns a rounding-level change into a different selection
    of (row, latent) pairs, and measured 3e-2 to 5e-2, as far apart as a bf16 run is from a float32 one.
    """
    from saeforge.training.run import build_sae

    ranks, one, (model, corpus) = runs
    two = ranks["topk"][0]
    assert (one["lm_dtype"], one["autocast"]) == ("bfloat16", True)
    assert one["step"] == two["step"] == TOKENS // B
    init = build_sae(run_config(model, corpus, "topk"), 64, torch.device("cpu"))[0].state_dict()
    ratios = {}
    for name, w1 in one["sae"].items():
        if not w1.is_floating_point() or w1.numel() <= 1:
            continue
        moved = (w1 - init[name]).norm()
        assert moved > 1e-3 * w1.norm(), name  # training moved it: the ratio below means something
        ratios[name] = float((two["sae"][name] - w1).norm() / moved)
    assert set(ratios) >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert max(ratios.values()) <= 4 * U, ratios
    # and bf16 rounding did change something: this is not the float32 path in disguise
    assert max(ratios.values()) > 1e-5, ratios
